import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared model zoo in models.py
