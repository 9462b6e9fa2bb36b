"""What every implementation shares verbatim: config, data, model, precision policy, device
switches, measurements, the run record and the environment probe. Never the training loop (that
is what is being compared) and never the tool around the loops (that is ampcompare/)."""
