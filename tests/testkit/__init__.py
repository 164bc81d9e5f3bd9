"""What the benchmarks (bench/) and the ecosystem tests (tests/ecosystem/) share, importable
without installing anything: free loopback ports and waits for a condition (local), the
resources a process uses and quantiles (measure), and the Appwrite stand-in behind
Validate (appwrite).

bench/ scripts put tests/ on sys.path themselves; tests/ecosystem/pytest.ini does it for
pytest (pythonpath). Only the standard library is used, so that bench/ runs on the
system's Python.
"""
