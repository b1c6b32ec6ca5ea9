"""ERNIE-4.5-VL model components."""

from ernie_platform.models.vl.image_processing import ErnieImageProcessor as ErnieImageProcessor
from ernie_platform.models.vl.image_processing import ImageProcessorConfig as ImageProcessorConfig
from ernie_platform.models.vl.image_processing import smart_resize as smart_resize
from ernie_platform.models.vl.prompt import IMAGE as IMAGE
from ernie_platform.models.vl.prompt import IMAGE_MARKER as IMAGE_MARKER
from ernie_platform.models.vl.prompt import build_mm_inputs as build_mm_inputs
from ernie_platform.models.vl.prompt import num_image_tokens as num_image_tokens
