import os

# Every test and every notebook kernel runs in the smallest profile unless told otherwise.
os.environ.setdefault("SDLEARN_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
# pytest-xdist runs one worker per core; each worker (and the notebook kernel it starts) uses one thread,
# so workers don't fight over cores (torch's OpenMP threads slow down ~10x when oversubscribed).
os.environ.setdefault("OMP_NUM_THREADS", "1")
