"""protege: on-policy distillation of large language models.

A small student generates its own answers, a teacher scores every token, and the student
learns to close the gap. See README.md for the two commands that run a distillation and the tests.
"""

__version__ = "0.1.0"
