"""Python client for the OpenVLA.NET policy server (contract openvla.v1).

Needs only Debian's python3-grpcio and python3-protobuf. Put src/RobotClients/python on PYTHONPATH:

    from openvla_client import PolicyClient, jpeg_image
    with PolicyClient("127.0.0.1:50051") as client:
        reply = client.predict([jpeg_image(open("frame.jpg", "rb").read())], "pick up the red block", unnorm_key="bridge_orig")
        print(list(reply.action.values))
"""
from openvla_client.client import (  # noqa: F401
    ActionChunkBroker,
    ActionStream,
    action_chunk,
    PolicyClient,
    jpeg_image,
    observation,
    png_image,
    raw_rgb_image,
)
from openvla.v1 import policy_pb2 as pb  # noqa: F401  (the generated messages, e.g. pb.ImageEncoding.IMAGE_ENCODING_JPEG)
