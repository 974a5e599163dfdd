"""The `fed` section: federated training of G1 (FedAvg, ALGORITHM.md 6).

The clients' local training takes every other setting from `train` (batch,
optimizer, p_healthy, n_shot, loss region, augmentation); train.center and
train.num_steps are the central trainer's and unused here.
dfgm_jax/config_checks.py says what each field accepts.
"""

import ml_collections


def get_fed_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Rounds R of FedAvg.
  c.rounds = 100
  # Local steps tau of every client per round (a multiple of
  # train.steps_per_dispatch); a client trains rounds x local_steps steps.
  c.local_steps = 500
  # Clients: comma-separated private centers, each with a <center>_train
  # split; '' = every private center of the slices (data.centers as
  # preprocessing resolved it).
  c.centers = ""
  # FedProx proximal strength mu toward the round's global parameters
  # (0 = plain FedAvg; ALGORITHM.md 6 suggests 0.01 for non-IID centers).
  c.fedprox_mu = 0.0
  # How the in-job engine runs the K clients of a round: stacked (one
  # vmapped program for all K), sequential (one client after another: K
  # times less activation memory), or auto (stacked on CPU unless it does
  # not fit the memory, sequential on GPU, where it was faster: see
  # federated.compile_programs).
  c.engine = "auto"
  return c


def get_decentralized_config() -> ml_collections.ConfigDict:
  """The `decentralized` section: which decentralized stages run_pipeline runs.

  All off here (default.py: the central pipeline); the demo turns all of
  them on, for the whole DFGM (ALGORITHM.md 6).
  """
  c = ml_collections.ConfigDict()
  # Train G1 with the federated in-job engine over config.fed.centers
  # (launch.train_federated) instead of centrally on config.train.center.
  c.federated_g1 = False
  # Train the shared model G2 on the public synthetic set and the healthy
  # slices only, and export it with its model card (launch.train_g2).
  c.g2 = False
  # Center 2's local synthesis with G2 (launch.synthesize_local): '' (none),
  # harmonise or generate; needs g2. Adds the evaluation's run D_local.
  c.local_synthesis = ""
  # Healthy slices per public tumor in local synthesis (0 = synthesis.k):
  # 1 gives as many local images as the published set holds, so that run
  # D_local adds as many synthetic slices as run D.
  c.local_k = 0
  return c
