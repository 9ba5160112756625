/*
 * rdnet-load: the connection-rate, latency and idle-flow load of bench/run,
 * in C so that the client is never what limits the kernel's own veth path
 * (issue 18: the Rust bench client read ~4 800 conn/s on veth where a C
 * client read ~11 000, which made every connection-rate ratio look good).
 * bench.py compiles it with the system's gcc at the start of every run.
 *
 *   rdnet-load server -b ADDR -p PORTS [-t THREADS]
 *       TCP and UDP echo on every port of PORTS ("7000", "7000-7009" or
 *       "7000,7100"): each thread has its own epoll and its own
 *       SO_REUSEPORT listeners, so the kernel spreads connections. On
 *       SIGUSR1, the thread that takes the signal writes 64 KiB (as much as
 *       fits) to each TCP connection it serves: data for a peer that may
 *       not be there to take it (the idle rows' simulated sleep).
 *   rdnet-load crr -a ADDR -p PORT -d SECONDS [-s SLICE] [-P THREADS]
 *       connect / write 1 byte / read it back / close, in a loop; the
 *       client closes first (its side keeps TIME-WAIT, as a real client's
 *       does). Prints JSON: conn/s, p50/p99/max connect-to-first-byte
 *       (from the start of connect() to the echoed byte), failures by
 *       kind, and the rate of every SLICE seconds.
 *   rdnet-load rr -a ADDR -p PORT -d SECONDS
 *       1-byte ping-pong on one connection; JSON: round trips/s, p50/p99.
 *   rdnet-load hold -a ADDR -p PORT -n TCP -u UDP -d SECONDS
 *       opens TCP connections and UDP "flows" (one datagram each way per
 *       socket), prints "ready tcp=N udp=M", then holds them, silent, for
 *       SECONDS (or until SIGTERM).
 *
 * Every loop is bounded in time; every socket wait has a timeout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *addr = "127.0.0.1";
static const char *ports = "7000";
static double seconds = 5, slice = 0;
static int threads = 1, ntcp = 100, nudp = 100;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* An IPv4 or IPv6 address (IPv6 if it has a colon) and its length. */
struct addr {
	struct sockaddr_storage ss;
	socklen_t len;
	int family;
};

static struct addr sockaddr_of(const char *ip, int port)
{
	struct addr a = {0};
	int ok;
	if (strchr(ip, ':')) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&a.ss;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		ok = inet_pton(AF_INET6, ip, &s6->sin6_addr);
		a.len = sizeof *s6;
		a.family = AF_INET6;
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&a.ss;
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		ok = inet_pton(AF_INET, ip, &s4->sin_addr);
		a.len = sizeof *s4;
		a.family = AF_INET;
	}
	if (ok != 1) {
		fprintf(stderr, "bad address %s\n", ip);
		exit(2);
	}
	return a;
}

/* A 5 s limit on every blocking call: SO_SNDTIMEO bounds connect() too. */
static void timeouts(int fd)
{
	struct timeval tv = {.tv_sec = 5};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void nodelay(int fd)
{
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ------------------------------------------------------------ server */

static int port_list(int *out, int max)
{
	int n = 0;
	char *copy = strdup(ports), *save = NULL;
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		int lo, hi;
		int k = sscanf(tok, "%d-%d", &lo, &hi);
		if (k < 1) {
			fprintf(stderr, "bad port list %s\n", ports);
			exit(2);
		}
		if (k == 1)
			hi = lo;
		for (int p = lo; p <= hi && n < max; p++)
			out[n++] = p;
	}
	free(copy);
	return n;
}

/* epoll data: the fd in the low 32 bits, its kind above. */
enum { CONN = 0, LISTENER = 1, UDP = 2 };

static volatile sig_atomic_t push;

static void on_usr1(int sig)
{
	(void)sig;
	push = 1;
}

#define MAXFD 65536

static void *server_thread(void *arg)
{
	(void)arg;
	int list[256], n = port_list(list, 256), one = 1;
	int ep = epoll_create1(0);
	if (ep < 0)
		die("epoll_create1");
	for (int i = 0; i < n; i++) {
		struct addr sa = sockaddr_of(addr, list[i]);
		for (int kind = LISTENER; kind <= UDP; kind++) {
			int fd = socket(sa.family, (kind == UDP ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK, 0);
			if (fd < 0)
				die("socket");
			setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
			setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
			if (bind(fd, (struct sockaddr *)&sa.ss, sa.len) < 0)
				die("bind");
			/* The backlog is capped by net.core.somaxconn (4096). */
			if (kind == LISTENER && listen(fd, 65535) < 0)
				die("listen");
			struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)kind << 32 | (uint32_t)fd};
			if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
				die("epoll_ctl");
		}
	}
	char buf[65536];
	/* This thread's connections, for the push on SIGUSR1. */
	char *mine = calloc(MAXFD, 1);
	struct epoll_event evs[256];
	for (;;) {
		int k = epoll_wait(ep, evs, 256, -1);
		if (k < 0 && errno == EINTR && push) {
			push = 0;
			memset(buf, 'p', sizeof buf);
			for (int fd = 0; fd < MAXFD; fd++)
				if (mine[fd] && write(fd, buf, sizeof buf) < 0 && errno != EAGAIN)
					mine[fd] = 0;
		}
		for (int i = 0; i < k; i++) {
			int fd = (int)(uint32_t)evs[i].data.u64, kind = (int)(evs[i].data.u64 >> 32);
			if (kind == LISTENER) {
				int c;
				while ((c = accept4(fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					nodelay(c);
					struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint32_t)c};
					if (c >= MAXFD || epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev) < 0)
						close(c);
					else
						mine[c] = 1;
				}
			} else if (kind == UDP) {
				struct sockaddr_storage from;
				socklen_t fl;
				ssize_t r;
				while (fl = sizeof from, (r = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl)) >= 0)
					sendto(fd, buf, r, 0, (struct sockaddr *)&from, fl);
			} else {
				ssize_t r = read(fd, buf, sizeof buf);
				if (r > 0) {
					/* 1-byte messages always fit the send buffer; a peer that
					 * stops reading bulk echo just loses the excess. */
					if (write(fd, buf, r) < 0 && errno != EAGAIN) {
						mine[fd] = 0;
						close(fd);
					}
				} else if (r == 0 || errno != EAGAIN) {
					mine[fd] = 0;
					close(fd); /* also removes it from the epoll set */
				}
			}
		}
	}
	return NULL;
}

static int server(void)
{
	/* No SA_RESTART: the signal must end the epoll_wait it lands in. */
	struct sigaction sa = {.sa_handler = on_usr1};
	sigaction(SIGUSR1, &sa, NULL);
	pthread_t t[64];
	for (int i = 1; i < threads && i < 64; i++)
		pthread_create(&t[i], NULL, server_thread, NULL);
	server_thread(NULL);
	return 0;
}

/* ------------------------------------------------------------ clients */

struct sample {
	uint32_t us;  /* connect-to-first-byte, or one round trip */
	uint32_t end; /* ms since the start: which slice it counts in */
};

struct run {
	double start, deadline;
	pthread_t tid;
	struct sample *s;
	size_t n, cap;
	/* failures by kind; errno values of connect() kept apart */
	long refused, addrnotavail, timeout, other, io;
};

static void record(struct run *r, double t0, double t1)
{
	if (r->n == r->cap) {
		r->cap = r->cap ? r->cap * 2 : 65536;
		r->s = realloc(r->s, r->cap * sizeof *r->s);
		if (!r->s)
			die("realloc");
	}
	r->s[r->n++] = (struct sample){(uint32_t)((t1 - t0) * 1e6), (uint32_t)((t1 - r->start) * 1e3)};
}

static void *crr_thread(void *arg)
{
	struct run *r = arg;
	struct addr sa = sockaddr_of(addr, atoi(ports));
	char b = 'x';
	while (now() < r->deadline) {
		int fd = socket(sa.family, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		nodelay(fd);
		timeouts(fd);
		double t0 = now();
		if (connect(fd, (struct sockaddr *)&sa.ss, sa.len) < 0) {
			int e = errno;
			close(fd);
			if (e == ECONNREFUSED)
				r->refused++;
			else if (e == EADDRNOTAVAIL)
				r->addrnotavail++;
			else if (e == EINPROGRESS || e == ETIMEDOUT || e == EAGAIN)
				r->timeout++;
			else
				r->other++;
			/* Out of ports or refused: fails at once. Back off a little so the
			 * loop does not take the CPU the path under test needs. */
			usleep(1000);
			continue;
		}
		if (write(fd, &b, 1) != 1 || read(fd, &b, 1) != 1) {
			r->io++;
			close(fd);
			continue;
		}
		record(r, t0, now());
		close(fd);
	}
	return NULL;
}

static void *rr_thread(void *arg)
{
	struct run *r = arg;
	struct addr sa = sockaddr_of(addr, atoi(ports));
	int fd = socket(sa.family, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	nodelay(fd);
	timeouts(fd);
	if (connect(fd, (struct sockaddr *)&sa.ss, sa.len) < 0) {
		r->other++;
		close(fd);
		return NULL;
	}
	char b = 'x';
	while (now() < r->deadline) {
		double t0 = now();
		if (write(fd, &b, 1) != 1 || read(fd, &b, 1) != 1) {
			r->io++;
			break;
		}
		record(r, t0, now());
	}
	close(fd);
	return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

/* The q-quantile of n sorted values (nearest rank). */
static uint32_t pct(const uint32_t *v, size_t n, double q)
{
	if (!n)
		return 0;
	size_t i = (size_t)(q * n);
	return v[i < n ? i : n - 1];
}

static int client(void *(*fn)(void *), const char *unit)
{
	int nt = threads < 1 ? 1 : threads > 64 ? 64 : threads;
	struct run runs[64];
	memset(runs, 0, sizeof runs);
	double start = now();
	for (int i = 0; i < nt; i++) {
		runs[i].start = start;
		runs[i].deadline = start + seconds;
		pthread_create(&runs[i].tid, NULL, fn, &runs[i]);
	}
	size_t total = 0;
	long refused = 0, addrnotavail = 0, timeout = 0, other = 0, io = 0;
	for (int i = 0; i < nt; i++) {
		pthread_join(runs[i].tid, NULL);
		total += runs[i].n;
		refused += runs[i].refused;
		addrnotavail += runs[i].addrnotavail;
		timeout += runs[i].timeout;
		other += runs[i].other;
		io += runs[i].io;
	}
	double elapsed = now() - start;
	int nslices = slice > 0 ? (int)(seconds / slice + 0.5) : 0;
	if (nslices < 1)
		nslices = 1;
	uint32_t *all = malloc((total + 1) * sizeof *all);
	size_t *per = calloc(nslices, sizeof *per);
	uint32_t **sl = calloc(nslices, sizeof *sl);
	for (int k = 0; k < nslices; k++)
		sl[k] = malloc((total + 1) * sizeof **sl);
	size_t j = 0;
	for (int i = 0; i < nt; i++)
		for (size_t m = 0; m < runs[i].n; m++) {
			struct sample s = runs[i].s[m];
			all[j++] = s.us;
			/* The last connection ends just after the deadline: count it in
			 * the last slice. */
			int k = slice > 0 ? (int)(s.end / (slice * 1e3)) : 0;
			if (k >= nslices)
				k = nslices - 1;
			sl[k][per[k]++] = s.us;
		}
	qsort(all, total, sizeof *all, cmp_u32);
	printf("{\"count\": %zu, \"seconds\": %.3f, \"rate\": %.1f, \"unit\": \"%s\", "
	       "\"p50_us\": %u, \"p99_us\": %u, \"max_us\": %u, "
	       "\"failed\": {\"refused\": %ld, \"addrnotavail\": %ld, \"timeout\": %ld, \"other\": %ld, \"io\": %ld}, "
	       "\"slices\": [",
	       total, elapsed, total / elapsed, unit, pct(all, total, 0.5), pct(all, total, 0.99),
	       total ? all[total - 1] : 0, refused, addrnotavail, timeout, other, io);
	double len = slice > 0 ? slice : elapsed;
	for (int k = 0; k < nslices; k++) {
		qsort(sl[k], per[k], sizeof **sl, cmp_u32);
		printf("%s{\"rate\": %.1f, \"p99_us\": %u, \"max_us\": %u}", k ? ", " : "", per[k] / len,
		       pct(sl[k], per[k], 0.99), per[k] ? sl[k][per[k] - 1] : 0);
	}
	printf("]}\n");
	return 0;
}

/* ------------------------------------------------------------ hold */

static volatile sig_atomic_t stopping;

static void on_term(int sig)
{
	(void)sig;
	stopping = 1;
}

static int hold(void)
{
	struct addr sa = sockaddr_of(addr, atoi(ports));
	int *fds = calloc(ntcp + nudp + 1, sizeof *fds), tcp_ok = 0, udp_ok = 0;
	char b;
	for (int i = 0; i < ntcp; i++) {
		int fd = socket(sa.family, SOCK_STREAM, 0);
		timeouts(fd);
		b = (char)i;
		if (connect(fd, (struct sockaddr *)&sa.ss, sa.len) == 0 && write(fd, &b, 1) == 1 && read(fd, &b, 1) == 1)
			tcp_ok++;
		fds[i] = fd;
	}
	for (int i = 0; i < nudp; i++) {
		int fd = socket(sa.family, SOCK_DGRAM, 0);
		struct timeval tv = {.tv_sec = 1};
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
		connect(fd, (struct sockaddr *)&sa.ss, sa.len);
		/* A datagram may be lost: three tries. */
		for (int t = 0; t < 3; t++)
			if (send(fd, &b, 1, 0) == 1 && recv(fd, &b, 1, 0) == 1) {
				udp_ok++;
				break;
			}
		fds[ntcp + i] = fd;
	}
	printf("ready tcp=%d udp=%d\n", tcp_ok, udp_ok);
	fflush(stdout);
	signal(SIGTERM, on_term);
	double end = now() + seconds;
	while (!stopping && now() < end)
		usleep(100000);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s server|crr|rr|hold [-b|-a ADDR] [-p PORTS] [-d S] [-s S] [-P N] [-t N] [-n N] [-u N]\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1];
	int c;
	optind = 2;
	while ((c = getopt(argc, argv, "a:b:p:d:s:P:t:n:u:")) != -1) {
		switch (c) {
		case 'a':
		case 'b': addr = optarg; break;
		case 'p': ports = optarg; break;
		case 'd': seconds = atof(optarg); break;
		case 's': slice = atof(optarg); break;
		case 'P':
		case 't': threads = atoi(optarg); break;
		case 'n': ntcp = atoi(optarg); break;
		case 'u': nudp = atoi(optarg); break;
		default: return 2;
		}
	}
	/* A peer that resets a connection must not end the run. */
	signal(SIGPIPE, SIG_IGN);
	if (!strcmp(mode, "server"))
		return server();
	if (!strcmp(mode, "crr"))
		return client(crr_thread, "conn/s");
	if (!strcmp(mode, "rr")) {
		threads = 1;
		return client(rr_thread, "rt/s");
	}
	if (!strcmp(mode, "hold"))
		return hold();
	fprintf(stderr, "unknown mode %s\n", mode);
	return 2;
}
