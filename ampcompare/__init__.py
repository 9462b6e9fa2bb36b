"""ampcompare: the tool around the training loops — the command line, compare (a fresh process
per run), report (tables, CSV, JSON) and chart. The loops themselves live in plain_torch/,
lightning_impl/, fabric_impl/, accelerate_impl/ and apex_impl/, over common/; this package
starts them, it never is them."""
