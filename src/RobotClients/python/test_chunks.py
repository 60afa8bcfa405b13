"""Tests of the Python client's chunk handling against a running OpenVLA.NET server that serves an OpenVLA-OFT
checkpoint (two cameras, proprio, chunks of 4).

Run by the C# test suite (tests/OpenVLA.Tests/Server/OftServerTests.cs), which serves tests/fixtures/oft-golden and
passes OPENVLA_SERVER (host:port) and OPENVLA_OFT_FIXTURE (the fixture folder, with expected.json from the independent
numpy implementation in tools/oftref)."""
import json
import os
import unittest

import grpc

from openvla_client import ActionChunkBroker, PolicyClient, action_chunk, png_image

SERVER = os.environ.get("OPENVLA_SERVER")
FIXTURE = os.environ.get("OPENVLA_OFT_FIXTURE")


class ChunkTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not SERVER or not FIXTURE:
            raise RuntimeError("OPENVLA_SERVER / OPENVLA_OFT_FIXTURE are not set: run these tests through ./openvla test")
        cls.client = PolicyClient(SERVER, timeout=30)
        cls.info = cls.client.wait_until_serving(timeout=60)
        with open(os.path.join(FIXTURE, "expected.json")) as f:
            cls.cases = json.load(f)["cases"]

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    def images(self, case):
        return [png_image(open(os.path.join(FIXTURE, name), "rb").read(), camera=camera)
                for name, camera in zip(case["images"], self.info.camera_names)]

    def test_info_describes_the_chunk(self):
        self.assertEqual(self.info.chunk_length, 4)
        self.assertEqual(self.info.proprio_dim, 5)
        self.assertEqual(list(self.info.camera_names), ["primary", "wrist"])
        self.assertEqual(self.info.action_head, "parallel-l1")

    def test_the_reply_carries_the_reference_chunk(self):
        for case in self.cases:
            reply = self.client.predict(self.images(case), case["instruction"], unnorm_key=case["unnorm_key"], proprio=case["proprio"])
            chunk = action_chunk(reply.action)
            expected = case["checkpoint-film"]["actions"]
            self.assertEqual(len(chunk), 4)
            for got, want in zip(chunk, expected):
                for g, w in zip(got, want):
                    self.assertAlmostEqual(g, w, delta=1e-4)
            self.assertEqual(list(reply.action.values), chunk[0])  # old clients read the first action

    def test_the_broker_asks_once_per_executed_chunk(self):
        case = self.cases[0]
        broker = ActionChunkBroker(self.client, execute_steps=3, unnorm_key=case["unnorm_key"])
        actions = [broker.act(self.images(case), case["instruction"], proprio=case["proprio"]) for _ in range(7)]
        self.assertEqual(broker.policy_calls, 3)  # steps 0, 3 and 6
        expected = case["checkpoint-film"]["actions"]
        for got, want in zip(actions, [expected[0], expected[1], expected[2]] * 2 + [expected[0]]):
            for g, w in zip(got, want):
                self.assertAlmostEqual(g, w, delta=1e-4)
        broker.reset()
        self.assertEqual(broker.policy_calls, 0)
        with self.assertRaises(ValueError):
            ActionChunkBroker(self.client, execute_steps=5, unnorm_key=case["unnorm_key"]).act(
                self.images(case), case["instruction"], proprio=case["proprio"])

    def test_a_missing_proprio_is_invalid_argument(self):
        case = self.cases[0]
        with self.assertRaises(grpc.RpcError) as caught:
            self.client.predict(self.images(case), case["instruction"], unnorm_key=case["unnorm_key"])
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("proprio is missing", caught.exception.details())


if __name__ == "__main__":
    unittest.main()
