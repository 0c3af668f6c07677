/* The backend of benches/gateway-vs-caddy.sh: a tiny HTTP/1.1 server that
 * keeps connections alive (busybox httpd closes every one, which made the
 * benchmark measure connection setup, not the proxies). One thread per
 * connection; every request (GET/HEAD, no body) gets the same 28-byte page,
 * `Connection: close` is honoured. Built static with musl-gcc by the bench:
 *
 *   musl-gcc -static -O2 -pthread -o keepalive-backend benches/keepalive-backend.c
 *   keepalive-backend PORT
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

static const char page[] = "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 28\r\n\r\n"
                           "hello from a ployz workload\n";

static int write_all(int fd, const char *p, size_t n) {
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w <= 0) return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* Whether the request head [p, end) asks for `Connection: close`. */
static int wants_close(const char *p, const char *end) {
	static const char h[] = "\r\nconnection:";
	for (; p + sizeof h - 1 < end; p++) {
		if (strncasecmp(p, h, sizeof h - 1) == 0) {
			const char *v = p + sizeof h - 1;
			while (v < end && *v == ' ') v++;
			return end - v >= 5 && strncasecmp(v, "close", 5) == 0;
		}
	}
	return 0;
}

static void *serve(void *arg) {
	int fd = (int)(long)arg;
	char buf[16384];
	size_t have = 0;
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	for (;;) {
		ssize_t r = read(fd, buf + have, sizeof buf - have);
		if (r <= 0) break;
		have += (size_t)r;
		char *start = buf, *end = buf + have, *e;
		int close_after = 0;
		while (!close_after && (e = memmem(start, (size_t)(end - start), "\r\n\r\n", 4)) != NULL) {
			close_after = wants_close(start, e + 2);
			if (write_all(fd, page, sizeof page - 1) != 0) goto out;
			start = e + 4;
		}
		if (close_after) break;
		have = (size_t)(end - start);
		memmove(buf, start, have);
		if (have == sizeof buf) break; /* a head larger than the buffer */
	}
out:
	close(fd);
	return NULL;
}

int main(int argc, char **argv) {
	int port = argc > 1 ? atoi(argv[1]) : 8080;
	signal(SIGPIPE, SIG_IGN);
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 1024) != 0) {
		perror("keepalive-backend: listen");
		return 1;
	}
	pthread_attr_t at;
	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&at, 64 * 1024);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0) continue;
		pthread_t t;
		if (pthread_create(&t, &at, serve, (void *)(long)c) != 0) close(c);
	}
}
