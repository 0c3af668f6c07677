#!/usr/bin/env python3
"""Send N DNS A queries for NAME to SERVER (UDP 53), one at a time, and print p50/p99.

    dnsq.py SERVER NAME [N]              the client (run it inside a workload's netns)
    dnsq.py --serve ADDR                 a stub upstream: answers every A query with 192.0.2.1
"""
import socket
import struct
import sys
import time


def query(name, qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)


def serve(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    while True:
        data, peer = s.recvfrom(4096)
        if len(data) < 12:
            continue
        qid = data[:2]
        end = 12
        while data[end] != 0:
            end += data[end] + 1
        question = data[12 : end + 5]
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 4) + bytes([192, 0, 2, 1])
        s.sendto(qid + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0) + question + answer, peer)


def main():
    if sys.argv[1] == "--serve":
        return serve(sys.argv[2])
    server, name = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((server, 53))
    times, fails = [], 0
    for i in range(n + 50):
        qid = i & 0xFFFF
        t = time.perf_counter()
        s.send(query(name, qid))
        try:
            while True:
                r = s.recv(4096)
                if r[:2] == struct.pack(">H", qid):
                    break
        except socket.timeout:
            fails += 1
            continue
        dt = time.perf_counter() - t
        if i >= 50:  # warm-up
            times.append(dt)
        rcode = r[3] & 0xF
        ancount = struct.unpack(">H", r[6:8])[0]
    times.sort()
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e6
    print(f"{name} via {server}: n={len(times)} p50={p(0.5):.0f}us p99={p(0.99):.0f}us "
          f"rcode={rcode} answers={ancount} timeouts={fails}")


if __name__ == "__main__":
    main()
