"""bf16 training of every architecture through Lightning (``precision: bf16-true`` and ``bf16-mixed``), and the
bits-per-byte sums staying float64 whatever the module's dtype."""

import lightning as L
import pytest
import torch

from mmbytes.codecs import MODALITIES
from mmbytes.lit import ByteLM
from mmbytes.metrics import BitsPerByte

ARCHS = ["debug", "transformer-debug", "spacebyte-debug", "blt-debug", "bpe-debug"]


def test_metric_sums_stay_float64_when_the_module_is_cast_to_bf16():
    m = BitsPerByte().to(dtype=torch.bfloat16)
    assert m.nats.dtype == torch.float64 and m.count.dtype == torch.float64
    nats = torch.tensor([1000.123456, 2.5], dtype=torch.bfloat16)
    m.update(nats, torch.tensor([3.0, 1.0]), torch.tensor([MODALITIES.index("text")] * 2))
    assert m.nats.dtype == torch.float64
    assert float(m.compute()["bpb"]) == pytest.approx(float(nats.double().sum()) / 4 / 0.6931471805599453)


class Windows(torch.utils.data.Dataset):
    """Real text windows from the shipped samples, as the datamodules give them."""

    def __init__(self, data: bytes, seq_len: int = 64, n: int = 8) -> None:
        self.x = torch.frombuffer(bytearray(data[: seq_len * n]), dtype=torch.uint8).long().view(n, seq_len)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "mask": torch.ones_like(self.x[i], dtype=torch.bool),
                "modality": torch.tensor(MODALITIES.index("text"))}


class Data(L.LightningDataModule):
    def __init__(self, text: bytes, seq_len: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters(ignore="text")  # seq_len: the window models prepare for (SpaceByte's cap)
        self.text = text

    def train_dataloader(self):
        return torch.utils.data.DataLoader(Windows(self.text, self.hparams.seq_len), batch_size=4)

    val_dataloader = train_dataloader


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("size", ARCHS)
def test_every_architecture_trains_and_validates_in_bf16(size, precision, text_bytes, tmp_path):
    lm = ByteLM(size=size, lr=1e-3, warmup_steps=1)
    if size.startswith("bpe"):  # a trained tokenizer, which the model keeps
        from mmbytes.model import bpe

        lm.model.set_tokenizer(*bpe.train_tokenizer([text_bytes], lm.config.vocab_size))
    data = Data(text_bytes)
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    before = [p.detach().float().clone() for p in lm.model.parameters() if p.requires_grad]
    trainer.fit(lm, data)
    after = [p.detach().float() for p in lm.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    bpb = trainer.callback_metrics["val/bpb"]
    assert torch.isfinite(bpb) and 1.0 < float(bpb) < 12.0

