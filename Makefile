# The two commands of the README. Both create or reuse .venv/ and reinstall only when requirements.txt changed.
#   make demo   the whole method end to end on a generated corpus (CPU, about 6 minutes with the install)
#   make demo-control   after make demo: the same run with --shuffle-pairs (the gain must vanish)
#   make test   the test suite
#   make bench-gpu   on a GPU machine: every GPU measurement of BENCHMARKS.md in one go
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements.txt
DEMO   := demo
RUN    := runs/demo
# The demo backbone: no ImageNet weights can be downloaded here, so the frozen ResNet-18 is random-initialised
# (seed 0, identical for the three datasets) and frames are 64x64 (a 2x2 patch grid) to fit a CPU.
PREP   := --backbone random --size 64 --workers 2

.PHONY: demo demo-control test bench-gpu clean
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements.txt into $(VENV) (about 90 s from a local package mirror)"
	$(PY) -m pip install --quiet --quiet --disable-pip-version-check -r requirements.txt
	cp requirements.txt $(STAMP)

demo: $(STAMP)
	$(PY) synth.py --out $(DEMO) --seed 0 --k700-clips 800 --k700-val-clips 100 --ucf-groups 9 --ucf-clips-per-group 3 --hmdb-clips-per-class 25
	$(PY) prepare.py --root $(DEMO)/k700 $(PREP) --store features --vocab-size 2000
	$(PY) prepare.py --root $(DEMO)/ucf101 $(PREP) --test-clips 4
	$(PY) prepare.py --root $(DEMO)/hmdb51 $(PREP) --test-clips 4
	$(PY) pretrain.py --data $(DEMO)/k700 --out $(RUN) --model small --losses av,vt,avt
	$(PY) probe.py --dataset ucf101 --root $(DEMO)/ucf101 --checkpoint $(RUN)/ckpt_last.pt --all-splits --out $(RUN)/probe_ucf101.json
	$(PY) probe.py --dataset ucf101 --root $(DEMO)/ucf101 --checkpoint random --config-from $(RUN)/ckpt_last.pt --all-splits --out $(RUN)/probe_ucf101_random.json
	$(PY) probe.py --dataset hmdb51 --root $(DEMO)/hmdb51 --checkpoint $(RUN)/ckpt_last.pt --all-splits --out $(RUN)/probe_hmdb51.json
	$(PY) probe.py --dataset hmdb51 --root $(DEMO)/hmdb51 --checkpoint random --config-from $(RUN)/ckpt_last.pt --all-splits --out $(RUN)/probe_hmdb51_random.json
	$(PY) probe.py --summary $(RUN)/probe_ucf101.json $(RUN)/probe_ucf101_random.json $(RUN)/probe_hmdb51.json $(RUN)/probe_hmdb51_random.json
	@echo "$(RUN)/loss.png (pre-training loss curves), $(RUN)/probe_*.md (paper-style tables)"

# the control beside the demo (after make demo): audio and titles paired with other clips' (--shuffle-pairs)
demo-control: $(STAMP)
	$(PY) pretrain.py --data $(DEMO)/k700 --out $(RUN)_shuffled --model small --losses av,vt,avt --shuffle-pairs
	$(PY) probe.py --dataset ucf101 --root $(DEMO)/ucf101 --checkpoint $(RUN)_shuffled/ckpt_last.pt --all-splits --out $(RUN)_shuffled/probe_ucf101.json
	$(PY) probe.py --summary $(RUN)/probe_ucf101.json $(RUN)_shuffled/probe_ucf101.json $(RUN)/probe_ucf101_random.json

test: $(STAMP)
	$(PY) -m pytest -q tests

# training throughput beside gpu_anchor.py, prepare's FrameEncoder vs a plain bf16 ResNet-18 pass (plus the decode
# path and the main thread's ceiling on this machine's CPU), prepare end to end with 8 and 15 decode workers, and
# the --store frames design (disk, loader, the CNN's clips/s on the GPU beside the step's).
# ANCHOR / MEDIA: gpu_anchor.py and the real media folder, where they are not at ../shared/ (benchmark.py's default)
bench-gpu: $(STAMP)
	$(PY) benchmark.py gpu $(if $(ANCHOR),--anchor $(ANCHOR))
	$(PY) benchmark.py prepare --cnn $(if $(MEDIA),--media $(MEDIA))
	$(PY) benchmark.py prepare-run --workers 8,15
	$(PY) benchmark.py augment $(if $(MEDIA),--media $(MEDIA))

clean:
	rm -rf $(DEMO) $(RUN) $(RUN)_shuffled
