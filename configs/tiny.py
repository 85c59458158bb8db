"""Tests and smoke runs: a small random BERT on the real MiniLM vocabulary, a small GIN, a slice
of PCdes, a few steps. Finishes in well under a minute on a CPU.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
    jaxmol-train --config tiny --workdir /tmp/tiny --data_dir /path/to/jaxmol/data  # installed
"""

from configs import default


def get_config():
    config = default.get_config()
    config.seed = 0
    config.data.val_split = "pcdes/validation"
    config.data.test_splits = ("pcdes/test",)
    config.data.max_text_length = 64
    config.data.text_buckets = (64,)  # one text shape and one graph shape: one compile
    config.data.single_graph_budget = True
    config.data.max_train_pairs = 96
    config.data.max_eval_pairs = 48
    config.model.text_init = "random"
    config.model.text_dropout = 0.0
    config.model.gin_layers = 2
    config.model.gin_dim = 32
    config.model.embed_dim = 32
    config.model.num_memory = 4
    config.model.num_heads = 2
    config.optim.lr = 1e-3
    config.optim.bert_lr = 1e-3
    config.optim.warmup_steps = 2
    config.optim.decay_ends_warmup_early = False
    config.batch_size = 16
    config.num_epochs = 1
    config.num_steps = 8
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    config.eval_batch_size = 16
    return config
