# nbgrader configuration for a course folder made by `python -m sdlearn.course make-course DIR`
# (copied there as DIR/nbgrader_config.py; CI's grading test uses this very file).
import os

c = get_config()  # noqa: F821 -- nbgrader defines get_config when it reads this file

c.CourseDirectory.course_id = "sdlearn"
# One assignment per notebook, named like it (00_overview, 01_self_attention, ...), one notebook each.

# Grade in the smoke profile: the checkers test each exercise's function on small inputs, which needs none of
# the cpu profile's ten minutes of training per notebook. Export SDLEARN_PROFILE before `nbgrader autograde` to
# grade at another size (the kernels inherit the environment).
os.environ.setdefault("SDLEARN_PROFILE", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")

# A cell may run for up to 5 minutes (nbgrader's default, 30 s, is shorter than some smoke-profile training
# cells on a slow machine); a cell that runs longer is interrupted and graded as an error, and grading goes on.
c.Execute.timeout = 300
c.Execute.interrupt_on_timeout = True
