"""The ``mmbytes`` command: LightningCLI's ``fit``, ``validate``, ``test``, ``predict`` plus ``shards``.

    mmbytes fit --config recipes/quickstart.yaml
    mmbytes shards samples/ --out data/mine --codec raw
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

EXTRA = {
    "shards": ("mmbytes.shards", "write webdataset shards + manifest from files"),
}


class MmbytesCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({
            "model": {"class_path": "mmbytes.lit.ByteLM"},
            "data": {"class_path": "datamodules.ByteDataModule"},
            "trainer.gradient_clip_val": 1.0,
        })


def main(argv: list[str] | None = None) -> None:
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
    run_cli(argv)


def run_cli(argv: list[str], **kwargs) -> MmbytesCLI:
    from lightning.pytorch import LightningDataModule, LightningModule

    return MmbytesCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      args=argv, save_config_kwargs={"overwrite": True}, **kwargs)


if __name__ == "__main__":
    main()
