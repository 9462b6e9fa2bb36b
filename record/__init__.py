"""A run's record and life: its folder and lock, its result.json (written, read and checked),
its checkpoints, how it ends (signals, failures, a full disk) and how it resumes, and the
environment it ran in. The arms use it through prepare(); it imports common/, never an arm or
ampcompare/."""
