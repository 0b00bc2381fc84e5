"""Keep pace on a busy machine: OpenMP threads that wait passively.

torch's OpenMP threads spin while they wait for work, by default. Beside other
CPU-bound processes (a download, a training job) every spinning thread takes a
core from them and from its own siblings, and LAPACK calls slow down many times
over: a cold plan of a 1024-wide trio took 3.0x its idle time beside two busy
processes (fair sharing: about 2x), and 2.7x less with the passive policy. The
policy is read once, when the OpenMP runtime starts, so our entry points set it
before torch is imported: `ner-merge` itself, and `mergekit-yaml` for NER
recipes only (through the import hook). A value the user set is kept.
"""

import os

WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"


def wait_passively() -> None:
    """Ask for passive OpenMP waiting, unless the user chose a policy."""
    os.environ.setdefault(WAIT_POLICY_VARIABLE, "PASSIVE")
