"""The evaluation tests use tiny models: one thread per process, the fixture of tests/standalone
(OpenMP oversubscription on a shared 2-core machine), restored after each module."""

from tests.standalone.conftest import _one_thread  # noqa: F401  (an autouse fixture)
