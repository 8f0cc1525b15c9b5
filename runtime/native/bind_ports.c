/*
 * Preloaded into fastvllm's vLLM servers (LD_PRELOAD): a TCP socket bound to port 0 ("any
 * free port") gets the next free port of FASTVLLM_BIND_PORTS ("LO-HI", below the kernel's
 * ephemeral range) instead of an ephemeral one.
 *
 * Why: a vLLM CPU worker holds about 13 listening sockets on ports the kernel picked (gloo's
 * process groups, torch's store), and CRIU must bind each one to the same port again on
 * restore. Ephemeral ports are also what every outgoing connection of the host uses: with a
 * Ray cluster on the host, a restore failed in CRIU with "Address already in use" (one cluster
 * test run in three). A port outside the ephemeral range is only ever taken by an explicit bind.
 *
 * The processes of one server draw from one sequence, kept in the file FASTVLLM_BIND_STATE
 * under flock, so one process never takes a port another found free a moment ago and is about
 * to bind (vLLM's get_open_port does that); the sequence starts at FASTVLLM_BIND_FIRST, which
 * fastvllm derives from the server's API port so that two servers of a host start far apart.
 * Without the state file each process counts on its own.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static long lo, hi, first, own_next;

__attribute__((constructor)) static void fastvllm_bind_ports_init(void)
{
	const char *range = getenv("FASTVLLM_BIND_PORTS");
	const char *f = getenv("FASTVLLM_BIND_FIRST");
	real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
	if (!range || sscanf(range, "%ld-%ld", &lo, &hi) != 2 || lo < 1 || hi > 65535 || lo > hi)
		lo = hi = 0;
	first = f ? strtol(f, NULL, 10) : lo;
	if (first < lo || first > hi)
		first = lo;
	own_next = first;
}

/* The next port of the sequence (shared through the state file when there is one). */
static long take_port(void)
{
	const char *state = getenv("FASTVLLM_BIND_STATE");
	long next = 0, port;
	int saved = errno, fd = state ? open(state, O_RDWR | O_CREAT | O_CLOEXEC, 0600) : -1;

	if (fd >= 0 && flock(fd, LOCK_EX) == 0) {
		if (pread(fd, &next, sizeof(next), 0) != sizeof(next) || next < lo || next > hi)
			next = first;
		port = next;
		next = port >= hi ? lo : port + 1;
		if (pwrite(fd, &next, sizeof(next), 0) != sizeof(next))
			own_next = next;
		flock(fd, LOCK_UN);
	} else {
		port = __atomic_fetch_add(&own_next, 1, __ATOMIC_RELAXED);
		port = lo + ((port - lo) % (hi - lo + 1));
	}
	if (fd >= 0)
		close(fd);
	errno = saved;
	return port;
}

static int is_tcp(int fd)
{
	int type = 0;
	socklen_t len = sizeof(type);
	return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM;
}

int bind(int fd, const struct sockaddr *addr, socklen_t addrlen)
{
	struct sockaddr_storage ss;
	long i;

	if (!real_bind) {
		errno = ENOSYS;
		return -1;
	}
	if (lo == 0 || !addr || addrlen > sizeof(ss) ||
	    (addr->sa_family != AF_INET && addr->sa_family != AF_INET6) ||
	    ((const struct sockaddr_in *)addr)->sin_port != 0 || !is_tcp(fd))
		return real_bind(fd, addr, addrlen);
	memcpy(&ss, addr, addrlen);
	for (i = 0; i <= hi - lo; i++) {
		/* sin_port and sin6_port sit at the same offset */
		((struct sockaddr_in *)&ss)->sin_port = htons((unsigned short)take_port());
		if (real_bind(fd, (struct sockaddr *)&ss, addrlen) == 0)
			return 0;
		if (errno != EADDRINUSE)
			return -1;
	}
	return real_bind(fd, addr, addrlen); /* the range is full: the kernel's choice */
}
