"""What the benchmarks (bench/) and the ecosystem tests (tests/ecosystem/) share, importable
without installing anything: free loopback ports and waits for a condition (local), the
resources a process uses and quantiles (measure), the Appwrite stand-in behind
Validate (appwrite), and an OpenID provider's keys and logout tokens (oidc).

bench/ scripts put tests/ on sys.path themselves; tests/ecosystem/pytest.ini does it for
pytest (pythonpath). Only the standard library is used, so that bench/ runs on the
system's Python; oidc imports PyJWT and cryptography (tests/ecosystem/requirements.txt)
when a key set is made.
"""
