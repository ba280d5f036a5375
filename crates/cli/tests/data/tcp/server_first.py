"""A server-first TCP server (as MySQL, SMTP or FTP are): greets each connection at once with
"220 greeter ready", then echoes every line. Listens on $PORT."""
import os
import socket
import threading


def serve(conn):
    with conn:
        conn.sendall(b"220 greeter ready\r\n")
        f = conn.makefile("rb")
        for line in f:
            conn.sendall(line)


def main():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(os.environ["PORT"])))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
