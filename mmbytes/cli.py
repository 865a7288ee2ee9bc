"""The ``mmbytes`` command: LightningCLI's ``fit``, ``validate``, ``test``, ``predict`` plus ``shards``.

    mmbytes fit --config recipes/quickstart.yaml
    mmbytes shards samples/ --out data/mine --codec auto
    mmbytes sample --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --modality text --num 4 --out out/
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

EXTRA = {
    "shards": ("mmbytes.shards", "write webdataset shards + manifest from files"),
    "sample": ("mmbytes.sample", "generate PNG / WAV / text / raw files from a checkpoint"),
}


EVAL_OPTIONS = ("strided_eval",)


class MmbytesCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "model": {"class_path": "mmbytes.lit.ByteLM"},
            "data": {"class_path": "datamodules.ByteDataModule"},
            "trainer.gradient_clip_val": 1.0,
        })

    def _parse_ckpt_path(self) -> None:
        """Lightning takes every model argument from a given checkpoint's hyperparameters. The architecture must come
        from there, but evaluation options (``--model.strided_eval``) are the user's to choose at evaluation time."""
        sub = self.config.get("subcommand")
        init = self.config[sub].model.get("init_args") if sub else None
        given = {k: init.get(k) for k in EVAL_OPTIONS} if init is not None else {}
        super()._parse_ckpt_path()
        if given:
            for k, v in given.items():
                self.config[sub].model.init_args[k] = v


def main(argv: list[str] | None = None) -> None:
    given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXTRA:
        import importlib

        importlib.import_module(EXTRA[argv[0]][0]).main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print("mmbytes commands besides LightningCLI's fit/validate/test/predict:")
        for name, (_, what) in EXTRA.items():
            print(f"  {name:10s} {what}")
        print()
    run_cli(given)  # None: LightningCLI reads sys.argv itself


def run_cli(argv: list[str] | None, **kwargs) -> MmbytesCLI:
    from lightning.pytorch import LightningDataModule, LightningModule

    return MmbytesCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      args=argv, save_config_kwargs={"overwrite": True}, **kwargs)


if __name__ == "__main__":
    main()
