import os

# every notebook and test runs in the smallest profile unless told otherwise
os.environ.setdefault("SDLEARN_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
