"""TorchServe v0.12's own examples as data: the README's archiver command line, the files its
``wget`` would fetch (made here with random weights), how it is served and the README's requests.

Paths are the README's, relative to ``cwd`` inside a checkout of TorchServe's tree at v0.12.0, so
the command lines stay as written; only the program name differs per archiver. Where a README downloads
weights, ``weights`` says how the same file is made offline: the model file's own class with random
weights saved by ``torch.save(state_dict)``, or the example's export script run with ``weights=None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    """One README request: ``curl -T FILE`` (a PUT of the file) or ``curl -d DATA`` (a POST)."""

    path: str
    file: str | None = None
    data: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    port: str = "inference"  # or "management", "metrics"
    client_batch: int = 0  # near_real_time_video's request.py: FILE sent as N base64 frames in JSON

    @property
    def method(self) -> str:
        if self.client_batch or self.data is not None:
            return "POST"
        return "PUT" if self.file is not None else "GET"


@dataclass(frozen=True)
class Weights:
    """The serialized file a README downloads or its script writes, made offline.

    ``kind`` "state_dict": the one nn.Module class in ``model_file`` (relative to the example's cwd),
    random weights, ``torch.save(model.state_dict(), out)``; "script": run ``model_file`` (the example's
    own export script) with its pretrained-weights argument replaced by ``weights=None``.
    """

    kind: str
    model_file: str
    out: str


@dataclass(frozen=True)
class Example:
    name: str
    cwd: str  # relative to the checkout root: where the README's commands run
    archive: str  # the README's archiver arguments, after the program name (split as a shell does)
    mar: str  # the archive the command writes, relative to cwd
    models: str | None  # torchserve --models VALUE; None: registered through the management API
    requests: tuple[Request, ...]
    weights: Weights | None = None
    register: str | None = None  # the README's management API query (POST /models?...)
    ts_config: str | None = None  # the README's --ts-config, relative to cwd
    slow: bool = False  # compiles a large model with torch.compile at its first request
    note: str = ""
    handler_kind: str = "built-in"
    extra_env: dict[str, str] = field(default_factory=dict)


# fmt: off
KITTEN = "examples/image_classifier/kitten.jpg"
INDEX = "examples/image_classifier/index_to_name.json"
RESNET18 = "examples/image_classifier/resnet_18/model.py"
MNIST = (
    "--model-name mnist --version 1.0 --model-file examples/image_classifier/mnist/mnist.py "
    "--serialized-file examples/image_classifier/mnist/mnist_cnn.pt --handler "
)
MNIST_FOLDER = "examples/image_classifier/mnist"
MNIST_WEIGHTS = Weights("state_dict", f"{MNIST_FOLDER}/mnist.py", f"{MNIST_FOLDER}/mnist_cnn.pt")
ZERO_PNG = "examples/image_classifier/mnist/test_data/0.png"


def _mnist(name: str, handler: str, config: str, requests: tuple[Request, ...], note: str = "") -> Example:
    return Example(name=name, cwd=".", archive=MNIST + handler, mar="mnist.mar", models="mnist=mnist.mar",
                   ts_config=config, requests=requests, weights=MNIST_WEIGHTS, handler_kind="custom",
                   note=note)


def _vision(folder: str, weights: str, model: str) -> Example:
    """The image_classifier README pattern: model.py + the downloaded .pth, handler image_classifier."""
    model_file = f"examples/image_classifier/{folder}/model.py"
    return Example(
        name=f"image_classifier/{folder}", cwd=".",
        archive=f"--model-name {model} --version 1.0 --model-file {model_file} --serialized-file {weights} "
        f"--handler image_classifier --extra-files {INDEX}",
        mar=f"{model}.mar", models=f"{model}={model}.mar",
        requests=(Request(f"/predictions/{model}", file=KITTEN),),
        weights=Weights("state_dict", model_file, weights),
    )


def _detector(folder: str, kind: str, model: str, weights: str, extra: str, served: str) -> Example:
    model_file = f"examples/{kind}/{folder}/model.py"
    handler = "object_detector" if kind == "object_detector" else "image_segmenter"
    return Example(
        name=f"{kind}/{folder}", cwd=".",
        archive=f"--model-name {model} --version 1.0 --model-file {model_file} --serialized-file {weights} "
        f"--handler {handler} --extra-files {extra}",
        mar=f"{model}.mar", models=f"{served}={model}.mar",
        requests=(Request(f"/predictions/{served}", file=f"examples/{kind}/persons.jpg"),),
        weights=Weights("state_dict", model_file, weights),
        note="its model file builds a pretrained backbone: torchvision finds a random one in TORCH_HOME",
    )


def _stateful(folder: str, server_ids: bool = False) -> Example:
    """The README's curl (the client names the sequence, seq_0 and seq_1) or, with ``server_ids``, the
    sequence protocol: a request without an id opens a sequence, the server's id names it afterwards."""
    seq = [("seq_0", n) for n in (1, 2, 3)] + [("seq_1", n) for n in (1, 2)]
    if server_ids:
        seq = [("", 1), ("@0", 2), ("@0", 3), ("", 1), ("@3", 2)]
    return Example(
        name=f"stateful/{folder}" + (" (server-made ids)" if server_ids else ""),
        cwd=f"examples/stateful/{folder}",
        archive="--model-name stateful --version 1.0 --model-file ../model.py --serialized-file "
        "../model_cnn.pt --handler stateful_handler.py -r ../requirements.txt "
        "--config-file model-config.yaml",
        mar="stateful.mar", models="stateful.mar", ts_config="../config.properties",
        requests=tuple(Request("/predictions/stateful", file=f"../sample/sample{n}.txt",
                               headers=(("ts_request_sequence_id", s),) if s else ()) for s, n in seq),
        weights=Weights("state_dict", "../model.py", "../model_cnn.pt"), handler_kind="custom",
        note="in order: sequence A samples 1, 2, 3, then sequence B samples 1, 2 (1, 3, 6, 1, 3 expected)",
    )


def _densenet_compiled(folder: str, model_file: str, handler: str, config: str, requests: int) -> Example:
    return Example(
        name=f"pt2/{folder}", cwd=f"examples/pt2/{folder}",
        archive=f"--model-name densenet161 --version 1.0 --model-file {model_file} --serialized-file "
        "densenet161-8d451a50.pth --export-path model_store --extra-files "
        f"../../image_classifier/index_to_name.json --handler {handler} --config-file {config} -f",
        mar="model_store/densenet161.mar", models="densenet161.mar",
        requests=(Request("/predictions/densenet161", file="../../image_classifier/kitten.jpg"),) * requests,
        weights=Weights("state_dict", model_file, "densenet161-8d451a50.pth"),
        handler_kind="built-in" if handler == "image_classifier" else "custom", slow=True,
    )


EXAMPLES: tuple[Example, ...] = (
    _mnist("image_classifier/mnist", f"{MNIST_FOLDER}/mnist_handler.py", f"{MNIST_FOLDER}/config.properties",
           (Request("/predictions/mnist", file=ZERO_PNG),)),
    _mnist("image_classifier/mnist (explanations)", f"{MNIST_FOLDER}/mnist_handler.py",
           f"{MNIST_FOLDER}/config.properties", (Request("/explanations/mnist", file=ZERO_PNG),)),
    _mnist("custom_metrics", "examples/custom_metrics/mnist_handler.py",
           "examples/custom_metrics/config.properties",
           (Request("/predictions/mnist", file=ZERO_PNG), Request("/metrics", port="metrics")),
           note="then GET :8082/metrics (the README's curl): ours must carry TorchServe's metric names"),
    _vision("densenet_161", "densenet161-8d451a50.pth", "densenet161"),
    _vision("resnet_18", "resnet18-f37072fd.pth", "resnet-18"),
    _vision("alexnet", "alexnet-owt-7be5be79.pth", "alexnet"),
    _vision("squeezenet", "squeezenet1_1-b8a52dc0.pth", "squeezenet1_1"),
    Example(
        name="image_classifier/vgg_16", cwd=".",
        archive="--model-name vgg16 --version 1.0 --model-file ./examples/image_classifier/vgg_16/model.py "
        "--serialized-file vgg16-397923af.pth --handler ./examples/image_classifier/vgg_16/vgg_handler.py "
        "--extra-files ./examples/image_classifier/index_to_name.json",
        mar="vgg16.mar", models="vgg16=vgg16.mar",
        requests=(Request("/predictions/vgg16", file=KITTEN),),
        weights=Weights("state_dict", "examples/image_classifier/vgg_16/model.py", "vgg16-397923af.pth"),
        handler_kind="custom",
    ),
    Example(
        name="image_classifier/resnet_152_batch", cwd=".",
        archive="--model-name resnet-152-batch --version 1.0 --model-file "
        "examples/image_classifier/resnet_152_batch/model.py --serialized-file resnet152-394f9c45.pth "
        f"--handler image_classifier --extra-files {INDEX}",
        mar="resnet-152-batch.mar", models=None,
        register="model_name=resnet152&url=resnet-152-batch.mar&batch_size=4&max_batch_delay=5000"
        "&initial_workers=3&synchronous=true",
        requests=tuple(Request("/predictions/resnet152", file=f"examples/image_classifier/resnet_152_batch/"
                               f"images/{n}.jpg") for n in ("croco", "dog", "kitten")),
        weights=Weights("state_dict", "examples/image_classifier/resnet_152_batch/model.py",
                        "resnet152-394f9c45.pth"),
        note="registered by the README's POST /models (batch_size=4); the three requests sent at once",
    ),
    Example(
        # create_mar_file.py --client-batching's command; the --model-file it names is missing from the
        # example, so resnet_18's (the same class) is given.
        name="image_classifier/near_real_time_video", cwd=".",
        archive="--model-name resnet-18 --version 1.0 --serialized-file resnet18-f37072fd.pth "
        f"--model-file {RESNET18} --extra-files {INDEX} --handler "
        "examples/image_classifier/near_real_time_video/near_real_time_video_handler.py --force",
        mar="resnet-18.mar", models="resnet-18=resnet-18.mar",
        requests=(Request("/predictions/resnet-18", file=KITTEN, client_batch=4,
                          headers=(("Content-type", "application/json"), ("Accept", "text/plain"))),),
        weights=Weights("state_dict", RESNET18, "resnet18-f37072fd.pth"), handler_kind="custom",
        note="request.py --client-batching: one JSON object of 4 base64 JPEG frames (the kitten)",
    ),
    _detector("fcn", "image_segmenter", "fcn_resnet_101", "fcn_resnet101_coco-7ecb50ca.pth",
              "examples/image_segmenter/fcn/fcn.py,examples/image_segmenter/fcn/intermediate_layer_getter.py",
              "fcn"),
    _detector("deeplabv3", "image_segmenter", "deeplabv3_resnet_101", "deeplabv3_resnet101_coco-586e9e4e.pth",
              "examples/image_segmenter/deeplabv3/deeplabv3.py,"
              "examples/image_segmenter/deeplabv3/intermediate_layer_getter.py,"
              "examples/image_segmenter/deeplabv3/fcn.py", "deeplabv3"),
    _detector("fast-rcnn", "object_detector", "fastrcnn", "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
              "examples/object_detector/index_to_name.json", "fastrcnn"),
    _detector("maskrcnn", "object_detector", "maskrcnn", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
              "examples/object_detector/index_to_name.json", "maskrcnn"),
    Example(
        name="micro_batching", cwd=".",
        archive=f"--model-name resnet-18_mb --version 1.0 --model-file ./{RESNET18} --serialized-file "
        "resnet18-f37072fd.pth --handler examples/micro_batching/micro_batching_handler.py --extra-files "
        "./examples/image_classifier/index_to_name.json --config-file examples/micro_batching/config.yaml",
        mar="resnet-18_mb.mar", models="resnet-18_mb.mar",
        requests=(Request("/predictions/resnet-18_mb", file="./examples/image_classifier/kitten.jpg"),),
        weights=Weights("state_dict", RESNET18, "resnet18-f37072fd.pth"), handler_kind="custom",
    ),
    _stateful("sequence_batching"),
    _stateful("sequence_batching", server_ids=True),
    _stateful("sequence_continuous_batching"),
    _stateful("sequence_continuous_batching", server_ids=True),
    Example(
        name="pt2/torch_export_aot_compile", cwd="examples/pt2/torch_export_aot_compile",
        archive="--model-name res18-pt2 --handler image_classifier --version 1.0 --serialized-file "
        "resnet18_pt2.so --config-file model-config.yaml --extra-files "
        "../../image_classifier/index_to_name.json",
        mar="res18-pt2.mar", models="res18-pt2=res18-pt2.mar",
        requests=(Request("/predictions/res18-pt2", file="../../image_classifier/kitten.jpg"),),
        weights=Weights("script", "resnet18_torch_export.py", "resnet18_pt2.so"),
        note="python resnet18_torch_export.py with weights=None: torch._export.aot_compile writes the .so",
    ),
    _densenet_compiled("torch_compile", "model.py", "image_classifier", "model-config.yaml", 1),
    _densenet_compiled("torch_inductor_caching", "../../image_classifier/densenet_161/model.py",
                       "./caching_handler.py", "model-config-fx-cache.yaml", 2),
)
# fmt: on
