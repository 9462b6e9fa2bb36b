"""The loop's ingredients, which every implementation shares verbatim: config, data, models,
precision policy, device switches, ranks and the measurements taken inside the loop. Never the
training loop (that is what is being compared), never the run's record (record/) and never the
tool around the loops (ampcompare/). It imports nothing of the project's but itself."""
