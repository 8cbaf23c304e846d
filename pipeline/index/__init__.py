"""The index: choice under a memory budget, build, recall, the files on disk, vectors, search, evaluation."""
