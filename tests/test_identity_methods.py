"""The identity benchmark's plumbing: combinations of methods (`--combine`), the held-out subjects a base's record
gives, a saved build of another spec."""

from __future__ import annotations

import pytest

from bench.identity import grids, run


def test_combine_merges_switches_and_settings():
    both = grids.combine("class_images+timestep_high")
    assert both.name == "class_images+timestep_high" and both.prior and not both.text_encoder
    assert dict(both.options) == {"train.timestep_bias": "high"}
    three = grids.combine("masked+prior+text_encoder+pivotal")
    assert three.text_encoder and not three.prior
    assert dict(three.options) == {
        "train.masked_loss": True,
        "train.mask_prior_weight": 1.0,
        "train.pivotal": True,
        "train.pivotal_learning_rate": 3e-3,
    }
    plain = {m.name: m for m in grids.METHODS}["plain"]
    assert (both.rank, both.lr) == (plain.rank, plain.lr)  # the plain LoRA's rank and lr, as every method cell


def test_flow_grid_and_levers_make_valid_configs_on_a_flow_base(tmp_path):
    """Every cell of `--grid flow` and every lever of the bar search gives a config sdlora accepts on the DiT base
    (its record says zimage), with the sampling it names; a lever added to a combination overrides the cell's own."""
    import json

    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "identity_base.json").write_text(json.dumps({"spec": {"kind": "zimage", "held_out": 3}}))
    # a lever that is pivotal tuning at its own rate stands in for `pivotal`
    rated = {lever.name for lever in grids.LEVERS if "train.pivotal_learning_rate" in dict(lever.options)}
    assert rated == {"pivotal_lr1e-3", "pivotal_lr3e-4"}
    cells = [
        *grids.FLOW,
        *(
            grids.combine(f"{'' if lever.name in rated else 'pivotal+'}class_images+{lever.name}")
            for lever in grids.LEVERS
        ),
    ]
    configs = {cell.name: run.make_config(folder, cell, grids.Scale(), tmp_path) for cell in cells}
    assert len(grids.FLOW) == 12 and configs["plain"].generate.scheduler == "flow_euler"
    assert configs["plain"].model.allow_distilled and configs["plain"].train.timestep_sampling == "auto"
    sampling = {name: (c.train.timestep_sampling, c.train.timestep_shift) for name, c in configs.items()}
    assert sampling["ts_shift6"] == ("shift", 6.0) and sampling["ts_uniform"][0] == "uniform"
    assert configs["lokr"].lora.kind == "lokr" and configs["output"].train.preservation == "output"
    assert (
        configs["pivotal+class_images+rank32"].lora.rank == 32 and configs["pivotal+class_images+rank32"].train.pivotal
    )
    assert configs["pivotal+class_images+pivotal_all"].train.pivotal_fraction == 1.0
    assert configs["pivotal+class_images+pivotal_short"].train.pivotal_fraction == 0.2
    assert configs["pivotal+class_images+cross_kv"].lora.targets == "cross_attention"
    assert configs["pivotal+class_images+cfg7"].generate.cfg == 7.0 and configs["plain"].generate.cfg == 4.0
    assert configs["pivotal+class_images+prior2"].train.prior_loss_weight == 2.0
    assert configs["pivotal+class_images+te_lr3e-4"].train.text_encoder_learning_rate == 3e-4
    with pytest.raises(ValueError, match="caption the class images differently"):
        grids.combine("class_captions+class_article")
    slow = configs["class_images+pivotal_lr3e-4"].train
    assert slow.pivotal and slow.pivotal_learning_rate == 3e-4 and slow.pivotal_fraction == 0.5
    with pytest.raises(ValueError, match="set train.pivotal_learning_rate differently"):
        grids.combine("pivotal+pivotal_lr1e-3")
    lokr = configs["pivotal+class_images+lokr_f2"].lora
    assert (lokr.kind, lokr.lokr_factor) == ("lokr", 2)
    assert dict(grids.combine("lokr+lokr_f4").options) == {"lora.kind": "lokr", "lora.lokr_factor": 4}


def test_combine_refuses_unknown_and_conflicting_methods(monkeypatch):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        grids.combine("plain+nope")
    methods = [*grids.METHODS, grids._method("timestep_low", train__timestep_bias="low")]
    monkeypatch.setattr(grids, "METHODS", methods)
    with pytest.raises(ValueError, match="set train.timestep_bias differently"):
        grids.combine("timestep_high+timestep_low")
    with pytest.raises(SystemExit):  # the command line says it in one line (argparse's error), before any work
        run.main(["--grid", "methods", "--combine", "plain+nope", "--base", "/nonexistent"])


def test_subjects_come_from_the_bases_record_and_a_seen_one_is_refused(tmp_path, capsys):
    """A record that predates `held_out` (the first published base) holds out the first two subjects, today's spec
    three; asking for a subject the base saw is refused in one line before any model loads."""
    import json

    from bench.identity import base

    legacy, today = tmp_path / "legacy", tmp_path / "today"
    for folder, spec in ((legacy, {"batch": 128}), (today, {"held_out": 3})):
        folder.mkdir()
        (folder / "identity_base.json").write_text(json.dumps({"spec": spec}))
    assert base.held_out_subjects(legacy) == base.SUBJECTS[:2]
    assert base.held_out_subjects(today) == base.SUBJECTS[:3]
    assert base.spec_of({"spec": {}}).attention_at == (16, 8)  # the legacy UNet layout
    with pytest.raises(SystemExit):
        run.main(["--base", str(legacy), "--only-subject", "2", "--out", str(tmp_path / "out")])
    assert "holds out 2 subjects (0 to 1)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_saved_build_of_another_spec_is_refused(tmp_path):
    import json

    from bench.identity import progress

    saved = tmp_path / "base.progress"
    saved.mkdir()
    (saved / "vae.json").write_text(json.dumps({"spec": {"vae_steps": 1}, "torch_rng": []}))
    state = progress.Progress(saved, {"vae_steps": 2}, log=lambda _: None)
    with pytest.raises(SystemExit, match="saved by a build of another spec; remove it or choose another --out"):
        state.load_vae()


def test_a_scale_lever_renders_with_a_weaker_lora(tmp_path, monkeypatch):
    """`scale0.6` (a lever of the bar search): the benchmark renders with the LoRA at 0.6 (generate's PATH:SCALE);
    a cell without it passes the path alone."""
    import sdlora.generate

    seen = []
    monkeypatch.setattr(sdlora.generate, "generate", lambda config, out: seen.append(config.generate.loras) or [])
    cell = grids.combine("pivotal+class_images+scale0.6")
    assert cell.lora_scale == 0.6 and grids.combine("pivotal+class_images").lora_scale == 1.0
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "identity_base.json").write_text('{"spec": {"kind": "sd1", "held_out": 3}}')
    config = run.make_config(folder, cell, grids.Scale(), None)
    run.render_prompts(config, tmp_path / "lora.safetensors", tmp_path / "out", scale=cell.lora_scale)
    run.render_prompts(config, tmp_path / "lora.safetensors", tmp_path / "out")
    assert seen == [[f"{tmp_path / 'lora.safetensors'}:0.6"], [str(tmp_path / "lora.safetensors")]]


def test_phrasings_reads_the_subjects_share_of_renders_and_refuses_a_missing_checkpoint(tmp_path):
    """bench/identity/phrasings.py (bleed in another phrasing of the class prompt): `shares` counts the renders
    the decoder reads as exactly the subject and those it reads at all; a cell the run never trained is refused in
    one line."""
    import json
    import random

    from PIL import Image

    from bench.identity import phrasings
    from sdlora.faces import toyworld as world

    subject, other = world.all_identities()[:2]
    rng = random.Random(0)
    paths = []
    for i, image in enumerate([world.render(subject, rng), world.render(other, rng), Image.new("RGB", (64, 64))]):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    assert phrasings.shares(paths, subject) == {"subject": 1 / 3, "valid": 2 / 3}
    assert phrasings.shares(paths[:1], subject) == {"subject": 1.0, "valid": 1.0}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "identity_base.json").write_text(json.dumps({"spec": {"kind": "zimage", "held_out": 3}}))
    with pytest.raises(SystemExit, match="no such checkpoint; give a cell, subject and --step the run trained"):
        phrasings.main([str(tmp_path), "output+lr1e-3:1"])
