"""A typed wrapper over the generated openvla.v1 stubs: deadlines on every call, retries while the server is
UNAVAILABLE (starting, restarting), bearer-token auth, TLS, and a latest-frame-wins streaming helper."""
import json
import queue
import threading
import time

import grpc

from openvla.v1 import policy_pb2 as pb
from openvla.v1 import policy_pb2_grpc as pb_grpc


def jpeg_image(data, camera="primary"):
    """An image message holding a complete JPEG file."""
    return pb.Image(camera=camera, encoding=pb.IMAGE_ENCODING_JPEG, data=bytes(data))


def png_image(data, camera="primary"):
    """An image message holding a complete PNG file."""
    return pb.Image(camera=camera, encoding=pb.IMAGE_ENCODING_PNG, data=bytes(data))


def raw_rgb_image(width, height, rgb, camera="primary"):
    """An image message holding raw RGB8 pixels (rows top to bottom, R,G,B interleaved)."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"raw RGB8 {width}x{height} needs {width * height * 3} bytes, got {len(rgb)}")
    return pb.Image(camera=camera, encoding=pb.IMAGE_ENCODING_RAW_RGB8, width=width, height=height, data=bytes(rgb))


def observation(images, instruction, unnorm_key="", proprio=(), robot_id="", episode_id="", seq=0, capture_time_unix_us=None):
    """An Observation message; capture time defaults to now."""
    if capture_time_unix_us is None:
        capture_time_unix_us = time.time_ns() // 1000
    return pb.Observation(images=list(images), instruction=instruction, unnorm_key=unnorm_key, proprio=list(proprio),
                          robot_id=robot_id, episode_id=episode_id, seq=seq, capture_time_unix_us=capture_time_unix_us)


def action_chunk(action):
    """The chunk of an Action message as a list of actions (each a list of action_dim floats), first action first. A
    plain OpenVLA server answers a chunk of one; a server older than chunks fills only `values`, which is used then."""
    if len(action.chunk) > 0:
        return [list(step.values) for step in action.chunk]
    return [list(action.values)]


class ActionChunkBroker:
    """Open-loop execution of action chunks (openpi's ActionChunkBroker idea): `act(...)` returns the action for this
    control step and asks the server for a new chunk only when the first `execute_steps` actions of the previous one
    (default: all of them) have been executed. Call `reset()` at the start of every episode.

        broker = ActionChunkBroker(client, execute_steps=4)
        for step in range(max_steps):
            robot.apply(broker.act([jpeg_image(full), jpeg_image(wrist, camera="wrist")], "put the cup on the plate",
                                   proprio=robot.state()))
    """

    def __init__(self, client, execute_steps=None, unnorm_key=""):
        if execute_steps is not None and execute_steps <= 0:
            raise ValueError("execute_steps must be positive")
        self.client = client
        self.execute_steps = execute_steps
        self.unnorm_key = unnorm_key
        self.policy_calls = 0
        self._pending = []

    def act(self, images, instruction, proprio=(), timeout=None):
        if not self._pending:
            reply = self.client.predict(images, instruction, unnorm_key=self.unnorm_key, proprio=proprio, timeout=timeout)
            chunk = action_chunk(reply.action)
            if self.execute_steps is not None and self.execute_steps > len(chunk):
                raise ValueError(f"execute_steps {self.execute_steps} is longer than the server's chunk of {len(chunk)}")
            self._pending = chunk[: self.execute_steps or len(chunk)]
            self.policy_calls += 1
        return self._pending.pop(0)

    def reset(self):
        self._pending = []
        self.policy_calls = 0


def _service_config(max_attempts, initial_backoff_s, max_backoff_s):
    return json.dumps({"methodConfig": [{
        "name": [{"service": "openvla.v1.PolicyService"}],
        "retryPolicy": {
            "maxAttempts": max_attempts,
            "initialBackoff": f"{initial_backoff_s}s",
            "maxBackoff": f"{max_backoff_s}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]})


class PolicyClient:
    """A connection to one policy server. Thread-safe; share one per server.

    address: "host:port". api_key: sent as "authorization: Bearer KEY". root_certificates (PEM bytes) turns on TLS;
    client_certificate/client_key (PEM bytes) answer a server that requires mutual TLS. timeout: default deadline in
    seconds of unary calls. Calls are retried with exponential backoff while the server is UNAVAILABLE."""

    def __init__(self, address="127.0.0.1:50051", api_key=None, root_certificates=None, client_certificate=None,
                 client_key=None, timeout=10.0, max_attempts=5, initial_backoff_s=0.1, max_backoff_s=2.0,
                 max_message_bytes=16 << 20, server_name_override=None):
        options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(max_attempts, initial_backoff_s, max_backoff_s)),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30000),
        ]
        if server_name_override:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        if root_certificates is not None or client_certificate is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=client_key,
                                                       certificate_chain=client_certificate)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    # -- unary calls ------------------------------------------------------------------------------------------------
    def info(self, timeout=None):
        """PolicyInfo: model, action dim, unnorm keys with statistics hashes, image size, limits."""
        return self._stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=timeout or self.timeout, metadata=self._metadata)

    def predict(self, images, instruction, unnorm_key="", proprio=(), seq=0, robot_id="", timeout=None):
        """One action for one observation (PredictResponse). Raises grpc.RpcError with the server's status code."""
        obs = observation(images, instruction, unnorm_key=unnorm_key, proprio=proprio, seq=seq, robot_id=robot_id)
        return self.predict_observation(obs, timeout=timeout)

    def predict_observation(self, obs, timeout=None):
        return self._stub.Predict(pb.PredictRequest(observation=obs), timeout=timeout or self.timeout, metadata=self._metadata)

    def wait_until_serving(self, timeout=60.0):
        """Blocks until the model is loaded and warmed up (GetPolicyInfo stops answering UNAVAILABLE); returns PolicyInfo."""
        give_up = time.monotonic() + timeout
        while True:
            try:
                return self.info(timeout=max(0.1, min(5.0, give_up - time.monotonic())))
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or time.monotonic() > give_up:
                    raise
                time.sleep(0.2)

    # -- streaming --------------------------------------------------------------------------------------------------
    def stream(self, timeout=None):
        """Opens a robot session (StreamActions). See ActionStream."""
        return ActionStream(self._stub, self._metadata, timeout)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ActionStream:
    """A robot session: submit() never blocks the control loop and keeps only the newest unsent frame (older ones are
    counted in dropped_before_send); the server drops frames that go stale in its queue and says how many in each
    reply's `skipped`. Replies (actions or per-frame errors) are read with replies()/next_reply(); `latest` is the
    newest reply. close() stops sending and waits for the replies to frames already sent."""

    _END = object()

    def __init__(self, stub, metadata, timeout):
        self._lock = threading.Condition()
        self._pending = None
        self._closed = False
        self.dropped_before_send = 0
        self.latest = None
        self.error = None
        self._replies = queue.Queue()
        self._call = stub.StreamActions(self._requests(), metadata=metadata, timeout=timeout)
        self._reader = threading.Thread(target=self._read, name="openvla-stream-reader", daemon=True)
        self._reader.start()

    def submit(self, obs):
        """Queues an Observation for sending, replacing any frame not sent yet."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream is closed")
            if self._pending is not None:
                self.dropped_before_send += 1
            self._pending = obs
            self._lock.notify()

    def _requests(self):
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._lock.wait()
                if self._pending is None:
                    return
                obs, self._pending = self._pending, None
            yield pb.StreamActionsRequest(observation=obs)

    def _read(self):
        try:
            for reply in self._call:
                self.latest = reply
                self._replies.put(reply)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = error
        finally:
            self._replies.put(self._END)

    def next_reply(self, timeout=None):
        """The next StreamActionsResponse, or None when the stream has ended (see .error). Raises queue.Empty on timeout."""
        reply = self._replies.get(timeout=timeout)
        if reply is self._END:
            self._replies.put(self._END)
            return None
        return reply

    def replies(self, timeout=None):
        while True:
            reply = self.next_reply(timeout)
            if reply is None:
                return
            yield reply

    def close(self, timeout=10.0):
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._reader.join(timeout)
        if self._reader.is_alive():
            self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
