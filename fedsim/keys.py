"""Names of records and entries in fedsim's messages, in one place.

Server and client code on different machines agree on these strings; keeping them
here means a typo is an ``AttributeError`` at import time, not a silent ``KeyError``
in round 37 on a remote node. Hyphenated names follow Flower's own convention
(``"num-examples"``, ``"server-round"``), so Flower's strategies read our replies.
"""

from typing import Final

# RecordDict entries of a message.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"

# Records the gradient-based strategies (BVR-L-SGD and its baselines) add.
ESTIMATE: Final = "estimate"  # the server's gradient estimate, sent with a local routine
CONTROL: Final = "control"  # SCAFFOLD: the server's control variate down, its change up

# Message types (Flower "actions") of the gradient-based strategies' exchanges.
TRAIN_ANCHOR: Final = "train.anchor"  # gradient at a stage's anchor point, remembered
TRAIN_GRADIENT: Final = "train.gradient"  # gradient at a point on a fresh minibatch
TRAIN_ESTIMATE: Final = "train.estimate"  # g(x; I) - g(x_prev; I) on one minibatch I
TRAIN_LOCAL: Final = "train.local"  # K local steps (SGD, or SARAH-corrected from an estimate)
TRAIN_SCAFFOLD: Final = "train.scaffold"  # K local steps with control variates

# ConfigRecord entries sent by the server.
SERVER_ROUND: Final = "server-round"
SEED: Final = "seed"
LR: Final = "lr"
LOCAL_EPOCHS: Final = "local-epochs"
BATCH_SIZE: Final = "batch-size"
LOCAL_STEPS: Final = "local-steps"  # K; gradient strategies count steps, not epochs

# MetricRecord entries sent back by clients.
NUM_EXAMPLES: Final = "num-examples"
TRAIN_LOSS: Final = "train_loss"
LOSS: Final = "loss"
DP_EPSILON: Final = "dp-epsilon"  # a DP-SGD client's ε so far (record-level)
ACCURACY: Final = "accuracy"
MSE: Final = "mse"  # mean squared error per target coordinate (regression)
PERPLEXITY: Final = "perplexity"  # exp of the mean next-token cross-entropy

# node_config entries, as Flower's simulation runtime and `flower-supernode
# --node-config` set them.
PARTITION_ID: Final = "partition-id"
NUM_PARTITIONS: Final = "num-partitions"
DATA_FILE: Final = "data-file"  # a node's own data (fedsim.data.node_files)

# Context.state entries a client keeps across rounds.
PREVIOUS_POINT: Final = "fedsim.previous-point"  # the last point a node's gradient was taken at
CLIENT_CONTROL: Final = "fedsim.control"  # SCAFFOLD's client control variate c_p

# GS-WGAN (``fedsim.strategies.gs_wgan``): generated images down, sanitized image gradients up.
TRAIN_GSWGAN: Final = "train.gswgan"  # critic steps, then the sanitized dL_G/dx~ of each image
FAKES: Final = "fakes"  # ArrayRecord of the generated images and their labels
IMAGES: Final = "images"
LABELS: Final = "labels"
GRADIENTS: Final = "gradients"  # ArrayRecord of the B sanitized image gradients
ITERATION: Final = "iteration"  # the generator step t (1, 2, ...), keys the client's draws
CRITIC_STEPS: Final = "critic-steps"
CLIP_NORM: Final = "clip-norm"
NOISE_MULTIPLIER: Final = "noise-multiplier"
BETA1: Final = "beta1"
BETA2: Final = "beta2"
WARM_START_STEPS: Final = "warm-start-steps"
GENERATOR: Final = "generator"  # import path of the generator factory (the warm start's)
LATENT_DIM: Final = "latent-dim"
NUM_CLASSES: Final = "num-classes"
DISCRIMINATOR: Final = "fedsim.gswgan.discriminator"  # a node's D, in Context.state
CRITIC_OPTIMIZER: Final = "fedsim.gswgan.critic-optimizer"  # its Adam moments
