"""Helpers the tests share: plain modules, no fixtures (those stay in ``conftest.py``).

Importable as the top-level package ``support`` because ``pyproject.toml`` puts
``tests/`` on ``sys.path`` (``[tool.pytest.ini_options] pythonpath``); helper scripts
that run outside pytest (``integration/selftest_netns.py``) put it there themselves.

    credentials   the test user's password, its hash, cheap argon2id parameters
    certificates  a trustme leaf written as chain, key and CA files
    configs       a gateway.toml for tests, the short admin socket path
    gateway       a gateway in a background thread (RunningGateway)
    process       ``python -m ftps_gateway serve`` as a real process tree
    control       raw control connections: plain, AUTH TLS only, TCP, read-until-quiet
    metrics       scraping ``/metrics`` into a dict
    state         driving ``session.state`` by hand: fake clock, settings, claims
    goclient      building and running the Go client of ``tests/clients/goftps``
    loginflood    a login flood from many addresses, a partner's login timed in it
    redis         a real redis-server on a Unix socket (the cluster tests)

Nothing here imports ``conftest`` or a test module: fixtures build on these helpers,
never the other way round.
"""
