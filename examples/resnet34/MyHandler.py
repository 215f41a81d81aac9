"""The seed walkthrough's custom handler: batched preprocess, argmax inference, {"label", "index"} answers."""

import io

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from handlers import BaseHandler


class MyHandler(BaseHandler):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.transform = transforms.Compose(
            [
                transforms.Resize(256),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        )

    def preprocess_one_image(self, req):
        """Process one single image."""
        # get image from the request: a multipart field "data", or the raw body (curl -T)
        image = req.get("data")
        if image is None:
            image = req.get("body")
        # create a stream from the encoded image; RGB so that grayscale and RGBA photos work too
        image = Image.open(io.BytesIO(image)).convert("RGB")
        image = self.transform(image)
        # add batch dim
        image = image.unsqueeze(0)
        return image

    def preprocess(self, requests):
        """Process all the images from the requests and batch them in a Tensor."""
        images = [self.preprocess_one_image(req) for req in requests]
        images = torch.cat(images)
        return images

    def inference(self, x):
        """Given the data from .preprocess, perform inference using the model.

        We return the predicted label for each image.
        """
        # my_handler.py calls this directly (not through BaseHandler.handle), so turn autograd off here.
        with torch.inference_mode():
            outs = self.model.forward(x.to(self.device))
            probs = F.softmax(outs, dim=1)
            preds = torch.argmax(probs, dim=1)
        return preds

    def postprocess(self, preds):
        """Given the data from .inference, postprocess the output.

        In our case, we get the human readable label from the mapping file and return a json.
        Keep in mind that the reply must always be an array since we are returning a batch of responses.
        """
        res = []
        # preds has size [BATCH_SIZE]; convert it to a list
        preds = preds.cpu().tolist()
        for pred in preds:
            label = self.mapping[str(pred)][1]
            res.append({"label": label, "index": pred})
        return res
