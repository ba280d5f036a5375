"""A grpcio client for trellis.demo.v1.Echo, used to check interop through the mesh.

The messages are encoded by hand (three scalar fields), so the only dependency is grpcio.
Usage: echo_client.py HOST:PORT  -> prints one JSON object with the results.
       echo_client.py HOST:PORT unary N  -> N unary calls; prints {"codes": {CODE: count}}.
"""
import json
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_request(message, count=0, fail_code=0):
    data = message.encode()
    out = b"\x0a" + varint(len(data)) + data
    if count:
        out += b"\x10" + varint(count)
    if fail_code:
        out += b"\x18" + varint(fail_code)
    return out


def decode_reply(buf):
    fields = {"message": "", "server": "", "index": 0}
    i = 0
    while i < len(buf):
        key = buf[i]
        i += 1
        field, wire = key >> 3, key & 7

        def read_varint():
            nonlocal i
            shift = value = 0
            while True:
                b = buf[i]
                i += 1
                value |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    return value

        if wire == 0:
            v = read_varint()
            if field == 3:
                fields["index"] = v
        elif wire == 2:
            n = read_varint()
            s = buf[i:i + n].decode()
            i += n
            if field == 1:
                fields["message"] = s
            elif field == 2:
                fields["server"] = s
        else:
            raise ValueError("unexpected wire type %d" % wire)
    return fields


def unary_calls(target, n):
    codes = {}
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        unary = channel.unary_unary("/trellis.demo.v1.Echo/Unary", request_serializer=lambda b: b, response_deserializer=decode_reply)
        for i in range(n):
            try:
                unary(encode_request("call %d" % i), timeout=10)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            codes[code] = codes.get(code, 0) + 1
    print(json.dumps({"codes": codes}))


def main():
    target = sys.argv[1]
    if len(sys.argv) > 3 and sys.argv[2] == "unary":
        return unary_calls(target, int(sys.argv[3]))
    results = {}
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        unary = channel.unary_unary("/trellis.demo.v1.Echo/Unary", request_serializer=lambda b: b, response_deserializer=decode_reply)
        results["unary"] = unary(encode_request("hello from python"), timeout=10)
        bidi = channel.stream_stream("/trellis.demo.v1.Echo/Bidi", request_serializer=lambda b: b, response_deserializer=decode_reply)
        replies = bidi(iter([encode_request("m%d" % i) for i in range(10)]), timeout=10)
        results["bidi"] = [r for r in replies]
        server_stream = channel.unary_stream("/trellis.demo.v1.Echo/ServerStream", request_serializer=lambda b: b, response_deserializer=decode_reply)
        results["server_stream"] = [r for r in server_stream(encode_request("s", count=5), timeout=10)]
        try:
            unary(encode_request("fail please", fail_code=5), timeout=10)
            results["error"] = None
        except grpc.RpcError as e:
            results["error"] = {"code": e.code().name, "details": e.details()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
