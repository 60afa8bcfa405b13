"""Tests of the Python client against a running OpenVLA.NET server.

Run by the C# test suite (tests/OpenVLA.Tests/Server/PythonClientTests.cs), which starts a real server on a free
loopback port with a deterministic test policy and passes OPENVLA_SERVER (host:port) and OPENVLA_API_KEY. The
deterministic policy answers value i = mean red level in [0,1] * (i+1) + 0.001 * len(instruction)."""
import os
import subprocess
import sys
import unittest

import grpc

from openvla_client import PolicyClient, jpeg_image, observation, pb, raw_rgb_image

SERVER = os.environ.get("OPENVLA_SERVER")
API_KEY = os.environ.get("OPENVLA_API_KEY")
HERE = os.path.dirname(os.path.abspath(__file__))


def frame(red, width=8, height=4):
    return raw_rgb_image(width, height, bytes([red, 40, 200]) * (width * height))


def expected(red, instruction):
    return [red / 255.0 * (i + 1) + 0.001 * len(instruction) for i in range(7)]


class PolicyClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not SERVER:
            raise RuntimeError("OPENVLA_SERVER is not set: run these tests through ./openvla test")
        cls.client = PolicyClient(SERVER, api_key=API_KEY, timeout=10)
        cls.client.wait_until_serving(timeout=30)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    def test_info_describes_the_policy(self):
        info = self.client.info()
        self.assertEqual(info.api_version, "openvla.v1")
        self.assertEqual(info.action_dim, 7)
        self.assertEqual([k.name for k in info.unnorm_keys], ["bridge_orig", "fractal20220817_data"])
        self.assertIn(pb.IMAGE_ENCODING_JPEG, info.accepted_encodings)

    def test_predict_returns_the_action_for_the_frame_sent(self):
        instruction = "pick up the red block"
        reply = self.client.predict([frame(102)], instruction, unnorm_key="bridge_orig", seq=7)
        self.assertEqual(reply.seq, 7)
        self.assertEqual(reply.action.unnorm_key, "bridge_orig")
        for got, want in zip(reply.action.values, expected(102, instruction)):
            self.assertAlmostEqual(got, want, places=5)
        self.assertEqual(reply.timings.batch_size, 1)

    def test_bad_input_is_invalid_argument_with_a_reason(self):
        with self.assertRaises(grpc.RpcError) as empty:
            self.client.predict([frame(1)], "", unnorm_key="bridge_orig")
        self.assertEqual(empty.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("instruction is empty", empty.exception.details())
        with self.assertRaises(grpc.RpcError) as truncated:
            self.client.predict([jpeg_image(b"\xff\xd8\xff\xe0\x00\x10JFIF")], "pick", unnorm_key="bridge_orig")
        self.assertEqual(truncated.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("truncated", truncated.exception.details())

    def test_stream_answers_each_frame_with_its_seq(self):
        with self.client.stream(timeout=20) as stream:
            for seq in range(1, 6):
                stream.submit(observation([frame(seq * 20)], "stack the cups", unnorm_key="fractal20220817_data", seq=seq))
                reply = stream.next_reply(timeout=10)
                self.assertEqual(reply.seq, seq)
                self.assertEqual(reply.WhichOneof("result"), "action")
                self.assertAlmostEqual(reply.action.values[0], expected(seq * 20, "stack the cups")[0], places=5)
        self.assertIsNone(stream.error)

    def test_a_call_without_the_api_key_is_unauthenticated(self):
        if not API_KEY:
            self.skipTest("server started without --api-key-file")
        with PolicyClient(SERVER, timeout=5) as anonymous:
            with self.assertRaises(grpc.RpcError) as error:
                anonymous.info()
        self.assertEqual(error.exception.code(), grpc.StatusCode.UNAUTHENTICATED)

    def test_the_example_robot_loop_runs_and_acts(self):
        key_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"openvla-py-key-{os.getpid()}")
        with open(key_file, "w") as f:
            f.write((API_KEY or "") + "\n")
        try:
            args = [sys.executable, os.path.join(HERE, "example_robot_loop.py"), "--server", SERVER, "--steps", "6",
                    "--hz", "20", "--unnorm-key", "bridge_orig"]
            if API_KEY:
                args += ["--api-key-file", key_file]
            result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=HERE))
        finally:
            os.remove(key_file)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("action for frame", result.stdout)


if __name__ == "__main__":
    unittest.main()
