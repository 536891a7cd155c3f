"""The final model and exported encoders of a run, made from its last complete checkpoint in storage.

The driver calls this after training, so no worker death between the last checkpoint and the export can leave a
finished run without its outputs, and an export that fails (out of memory, say) does not make Ray retry the
training. Each checkpoint holds a safetensors copy of the whole model under ``volta/`` (rank 0 writes it), which
is all the export needs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from volta import failpoints
from volta.config import VoltaConfig
from volta.run_storage import RunStorage

__all__ = ["finalize_run"]

log = logging.getLogger(__name__)


def finalize_run(config: VoltaConfig, storage: RunStorage, local_dir: Path) -> dict[str, str]:
    """Write ``final/`` and ``export/`` into the run's storage folder (and the local cache ``local_dir``) from
    the newest complete checkpoint; returns their locations and the checkpoint used."""
    from volta.data.tokenizer import load_tokenizer
    from volta.models.export import CHECKPOINT_FILES, export_encoders, load_volta_checkpoint

    name, _ = storage.newest_complete_checkpoint()
    if name is None:
        names = storage.checkpoint_names()
        if not names:
            raise FileNotFoundError(f"{storage.url()}: the run has no checkpoint to export")
        name = names[-1]  # a checkpoint from before manifests existed: registered by Ray, so complete
    with tempfile.TemporaryDirectory(prefix="volta-final-") as tmp:
        source = storage.get_dir(f"{name}/volta", Path(tmp) / "volta")
        missing = [f for f in CHECKPOINT_FILES if not (source / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{storage.url(name)}/volta: no {missing[0]}")
        model, _ = load_volta_checkpoint(source)
        final, export = local_dir / "final", local_dir / "export"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(source, final)
        storage.put_dir("final", final)
        failpoints.kill_once("kill_in_export")
        export_encoders(model, export, config, tokenizer=load_tokenizer(config.tokenizer_name))
        storage.put_dir("export", export)
    log.info("final model and exported encoders from %s in %s", name, storage.url())
    return {"checkpoint": storage.url(name), "final": storage.url("final"), "export": storage.url("export")}
