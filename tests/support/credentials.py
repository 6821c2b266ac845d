"""The test user's password and its argon2id hash, made with cheap parameters.

The real argon2id cost is a production setting; tests pay for it only where they
measure it. Imports nothing from the tests.
"""

from __future__ import annotations

import argon2

# Cheap argon2id parameters for tests: the real cost is a production setting.
FAST_PARAMETERS = argon2.Parameters(
    type=argon2.Type.ID,
    version=19,
    salt_len=16,
    hash_len=32,
    time_cost=1,
    memory_cost=8,
    parallelism=1,
)

PASSWORD = "correct horse battery staple"
PASSWORD_HASH = argon2.PasswordHasher.from_parameters(FAST_PARAMETERS).hash(PASSWORD)
