"""The seed's entry point: a module-level handler instance behind a handle(data, context) function."""

from MyHandler import MyHandler

_service = MyHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)

    # the server calls handle(None, context) once at load time, to initialize
    if data is None:
        return None

    data = _service.preprocess(data)
    data = _service.inference(data)
    data = _service.postprocess(data)

    return data
