#!/usr/bin/env python3
"""Example robot control loop against an OpenVLA.NET policy server.

A simulated robot captures a frame at a fixed rate, streams it to the server (latest frame wins), and applies the
newest action it has to its end-effector pose. Replace capture_frame() and apply_action() with your camera and robot.

    PYTHONPATH=src/RobotClients/python /usr/bin/python3 src/RobotClients/python/example_robot_loop.py \
        --server 127.0.0.1:50051 --image frame.jpg --instruction "pick up the red block" --unnorm-key bridge_orig --steps 50
"""
import argparse
import sys
import time

from openvla_client import PolicyClient, jpeg_image, observation, png_image, raw_rgb_image


def synthetic_frame(step, size=224):
    """A raw RGB frame with a block that moves with the step: stands in for a camera."""
    pixels = bytearray(size * size * 3)
    x0 = 20 + (step * 5) % (size - 60)
    for y in range(size):
        row = y * size * 3
        for x in range(size):
            p = row + 3 * x
            inside = x0 <= x < x0 + 40 and size // 2 <= y < size // 2 + 40
            pixels[p:p + 3] = (220, 30, 30) if inside else (90 + y // 3, 90, 140)
    return raw_rgb_image(size, size, bytes(pixels))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--api-key-file", help="file whose first line is the API key")
    parser.add_argument("--tls-ca", help="PEM certificate to trust for the server (turns on TLS)")
    parser.add_argument("--image", help="JPEG/PNG file used as every camera frame (default: a synthetic moving scene)")
    parser.add_argument("--instruction", default="pick up the red block")
    parser.add_argument("--unnorm-key", default="")
    parser.add_argument("--hz", type=float, default=10.0, help="control rate")
    parser.add_argument("--steps", type=int, default=50, help="control steps to run (the loop always stops)")
    args = parser.parse_args()

    api_key = open(args.api_key_file).read().split()[0] if args.api_key_file else None
    roots = open(args.tls_ca, "rb").read() if args.tls_ca else None
    fixed = None
    if args.image:
        data = open(args.image, "rb").read()
        fixed = png_image(data) if data[:4] == b"\x89PNG" else jpeg_image(data)

    with PolicyClient(args.server, api_key=api_key, root_certificates=roots) as client:
        info = client.wait_until_serving(timeout=120)
        print(f"connected: {info.model_id} (version {info.model_version}), action dim {info.action_dim}, "
              f"image {info.image_size}x{info.image_size}", file=sys.stderr)
        pose = [0.0] * 6
        gripper = 1.0
        period = 1.0 / args.hz
        acted_on = 0
        with client.stream() as stream:
            start = time.monotonic()
            for step in range(1, args.steps + 1):
                frame = fixed if fixed is not None else synthetic_frame(step)
                stream.submit(observation([frame], args.instruction, unnorm_key=args.unnorm_key, robot_id="example-robot", seq=step))
                reply = stream.latest
                if reply is not None and reply.HasField("action") and reply.seq > acted_on:
                    acted_on = reply.seq  # act once per fresh action; hold still otherwise
                    values = list(reply.action.values)
                    pose = [p + d for p, d in zip(pose, values[:6])]
                    gripper = values[6] if len(values) > 6 else gripper
                    print(f"step {step:3d}: action for frame {reply.seq} (skipped {reply.skipped}) -> "
                          f"xyz {pose[0]:+.3f} {pose[1]:+.3f} {pose[2]:+.3f} gripper {gripper:.2f}")
                elif reply is not None and reply.HasField("error"):
                    print(f"step {step:3d}: frame {reply.seq} refused: {reply.error.message}", file=sys.stderr)
                time.sleep(max(0.0, start + step * period - time.monotonic()))
        if stream.error is not None:
            print(f"stream ended: {stream.error.code().name}: {stream.error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
