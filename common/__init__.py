"""What the three implementations share verbatim: config, data, model, precision policy,
metrics, results and the CLI. Never the training loop: that is what is being compared."""
