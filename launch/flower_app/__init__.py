"""The Flower app (engine 2 of federated G1): hospitals on their own machines.

`[tool.flwr.app]` in pyproject.toml names its two components:

  server_app.app  ServerApp: FedAvg over the global parameters and EMA,
                  weighted by the sites' private slice counts; a checkpoint
                  per round in the server's workdir (export it with
                  launch.export_model); a new `flwr run` with the same
                  config and workdir resumes after the last one.
  client_app.app  ClientApp: one site's round, federated.client_update on
                  the site's own preprocessed slices (data_dir and center
                  from the SuperNode's --node-config), the same program,
                  RNG and batches as the in-job engine; its state between
                  rounds keyed by the server's run key (stable across the
                  `flwr run`s of one run), not Flower's run id.

secure.py: SecAgg+ (run config secure-aggregation=true), Flower's legacy
server workflow and secaggplus_mod. settings.py holds what both read: the
run config (the ml_collections config file, typed keys and overrides), the
site's node config and the arrays' wire format; logs.py their log lines
(each once, the run's round numbers). runner.py is not part of the app:
launch.flower_run's logic (submit a run, follow it, say how it ended; a
SuperLink and SuperNodes on this machine).
Lives in launch/ because the ClientApp reads slices (data_pipeline); the
library dfgm_jax/ imports neither. README: "train G1 federated with Flower".
"""
