"""PCdes paragraph-level fine-tuning settings of the official code (`code/finetune.py`):
30 epochs, batch 64, Adam lr 5e-5 for every parameter, no schedule; evaluated on the MoMu
variant of PCdes (without the 8 ids MoMu could not parse).

    python train.py --config configs/pcdes.py --workdir runs/pcdes
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.train_split = "pcdes_momu/train"
    config.data.val_split = "pcdes_momu/validation"
    config.data.test_splits = ("pcdes_momu/test",)
    config.batch_size = 64
    config.num_epochs = 30
    config.optim.lr = 5e-5
    config.optim.bert_lr = 5e-5
    config.optim.warmup_steps = 0
    config.optim.decay_ends_warmup_early = False
    config.optim.schedule = "constant"
    return config
