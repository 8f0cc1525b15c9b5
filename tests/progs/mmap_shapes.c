/*
 * A process with the mapping shapes a CRIU restore must get right, for tests/test_criu_mmap.py:
 * every byte is a pure function of (region, page, generation), so the process can check all of
 * its memory after a restore without trusting any bookkeeping that was itself restored.
 *
 *   mmap_shapes WORKDIR
 *
 * Writes WORKDIR/ready once its memory is set up (generation 1). For each WORKDIR/go-N that
 * appears, it checks every byte against generation N and writes WORKDIR/out-N ("ok ..." or
 * "bad ..."), then moves its memory on to generation N+1 (rewrites some pages, including pages
 * that were holes and pages that a restore mapped from the image) and waits for the next go.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MB (1024UL * 1024UL)

enum { ANON_HOLES, ANON_RO, SHARED_ANON, FILE_PRIVATE, GROWSDOWN, HUGE_SPARSE, HEAP, NREGIONS };
static const char *names[NREGIONS] = { "anon_holes", "anon_ro", "shared_anon", "file_private",
				       "growsdown", "huge_sparse", "heap" };
static const unsigned long sizes[NREGIONS] = { 64 * MB, 4 * MB, 8 * MB, 4 * MB, 1 * MB, 1024 * MB, 8 * MB };
static unsigned char *base[NREGIONS];

/* What a page holds: zero, the backing file's bytes, or a pattern for (region, page, gen). */
enum { ZERO = -1, FILEDATA = -2 };

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static void fill(unsigned char *p, int region, unsigned long page, int gen)
{
	uint64_t *w = (uint64_t *)p;
	uint64_t seed = ((uint64_t)region << 48) ^ ((uint64_t)page << 8) ^ (uint64_t)gen;

	for (unsigned i = 0; i < PAGE / 8; i++)
		w[i] = mix(seed + i);
}

/* The generation whose pattern `page` of `region` holds at generation `gen`. */
static int expected(int r, unsigned long p, int gen)
{
	int g = ZERO;

	switch (r) {
	case ANON_HOLES:
		/*
		 * Written pages and holes: short runs below page 4096 (read, not mapped, by
		 * default), long runs above, two large holes; some holes only ever read
		 * (the zero page)
		 */
		if (p < 4096 ? p % 7 == 3 : p % 61 == 3)
			break;
		if ((p >= 1000 && p < 1100) || (p >= 9000 && p < 9500))
			break;
		g = 1;
		break;
	case ANON_RO: /* written, then made read-only */
	case GROWSDOWN:
		g = 1;
		break;
	case SHARED_ANON:
		g = p % 2 ? ZERO : 1;
		break;
	case FILE_PRIVATE: /* a private file mapping: written pages are anonymous copies */
		g = p % 2 ? FILEDATA : 1;
		break;
	case HUGE_SPARSE: /* 1 GiB reserved, 5 scattered pages and one 32-page run touched */
		if (p == 0 || p == 4097 || p == 100000 || p == 200001 || p == 262143 || (p >= 50000 && p < 50032))
			g = 1;
		break;
	case HEAP:
		g = 1;
		break;
	}
	/* Each later generation rewrites a fifth of the writable private pages, holes included */
	for (int k = 2; k <= gen; k++) {
		if (r == ANON_HOLES && p % 5 == (unsigned long)k % 5)
			g = k;
		if (r == FILE_PRIVATE && p % 3 == 0)
			g = k;
		if (r == HUGE_SPARSE && (p == 7 || p == 50001))
			g = k;
		if (r == HEAP && p % 4 == 0)
			g = k;
	}
	return g;
}

static void write_gen(int gen)
{
	for (int r = 0; r < NREGIONS; r++) {
		unsigned long n = sizes[r] / PAGE;

		if (r == ANON_RO && gen > 1)
			continue;
		for (unsigned long p = 0; p < n; p++) {
			if (expected(r, p, gen) == gen) /* first written at this generation */
				fill(base[r] + p * PAGE, r, p, gen);
		}
	}
	/* Pages only read stay the shared zero page: CRIU must not dump them */
	if (gen == 1)
		for (unsigned long p = 3; p < 4096; p += 37 * 7)
			(void)*(volatile unsigned char *)(base[ANON_HOLES] + p * PAGE);
}

static unsigned char filepage(unsigned long p, unsigned i)
{
	return (unsigned char)(p * 31 + i * 7 + 1);
}

static int check(int gen, char *msg, size_t len)
{
	static unsigned char want[PAGE];
	unsigned long bad = 0, pages = 0;
	char first[96] = "";

	for (int r = 0; r < NREGIONS; r++) {
		unsigned long n = sizes[r] / PAGE;

		for (unsigned long p = 0; p < n; p++) {
			int g = expected(r, p, gen);

			if (g == ZERO)
				memset(want, 0, PAGE);
			else if (g == FILEDATA)
				for (unsigned i = 0; i < PAGE; i++)
					want[i] = filepage(p, i);
			else
				fill(want, r, p, g);
			pages++;
			if (memcmp(base[r] + p * PAGE, want, PAGE)) {
				if (!bad++)
					snprintf(first, sizeof(first), "%s page %lu (expected gen %d)", names[r], p, g);
			}
		}
	}
	if (bad)
		snprintf(msg, len, "bad %lu of %lu pages differ, first: %s\n", bad, pages, first);
	else
		snprintf(msg, len, "ok %lu pages checked, generation %d\n", pages, gen);
	return bad ? 1 : 0;
}

static void put(const char *dir, const char *name, const char *text)
{
	char path[4096], tmp[4200];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f || fputs(text, f) < 0 || fclose(f)) {
		perror(tmp);
		exit(2);
	}
	rename(tmp, path);
}

static void *map(unsigned long len, int prot, int flags, int fd)
{
	void *p = mmap(NULL, len, prot, flags, fd, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return p;
}

int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : ".";
	char path[4096], msg[256];
	int fd;

	base[ANON_HOLES] = map(sizes[ANON_HOLES], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	base[ANON_RO] = map(sizes[ANON_RO], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	base[SHARED_ANON] = map(sizes[SHARED_ANON], PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1);
	base[HUGE_SPARSE] = map(sizes[HUGE_SPARSE], PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1);

	/* A growsdown mapping with room below it, as a thread stack made by hand */
	{
		unsigned char *hole = map(sizes[GROWSDOWN] + 16 * MB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1);

		munmap(hole, sizes[GROWSDOWN] + 16 * MB);
		base[GROWSDOWN] = mmap(hole + 16 * MB, sizes[GROWSDOWN], PROT_READ | PROT_WRITE,
				       MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN | MAP_FIXED, -1, 0);
		if (base[GROWSDOWN] == MAP_FAILED) {
			perror("mmap growsdown");
			return 2;
		}
	}

	/* The brk heap */
	base[HEAP] = sbrk(0);
	base[HEAP] = (unsigned char *)(((unsigned long)base[HEAP] + PAGE - 1) & ~(PAGE - 1));
	if (brk(base[HEAP] + sizes[HEAP])) {
		perror("brk");
		return 2;
	}

	/* A private mapping of a file that stays in WORKDIR */
	snprintf(path, sizeof(path), "%s/backing.bin", dir);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0) {
		perror(path);
		return 2;
	}
	for (unsigned long p = 0; p < sizes[FILE_PRIVATE] / PAGE; p++) {
		unsigned char buf[PAGE];

		for (unsigned i = 0; i < PAGE; i++)
			buf[i] = filepage(p, i);
		if (write(fd, buf, PAGE) != (ssize_t)PAGE) {
			perror("write");
			return 2;
		}
	}
	base[FILE_PRIVATE] = map(sizes[FILE_PRIVATE], PROT_READ | PROT_WRITE, MAP_PRIVATE, fd);
	close(fd);

	write_gen(1);
	mprotect(base[ANON_RO], sizes[ANON_RO], PROT_READ);
	if (check(1, msg, sizeof(msg))) {
		fputs(msg, stderr);
		return 1;
	}
	put(dir, "ready", "1\n");

	for (int gen = 1;; gen++) {
		struct timespec ts = { 0, 20 * 1000 * 1000 };
		char name[32];

		snprintf(name, sizeof(name), "go-%d", gen);
		snprintf(path, sizeof(path), "%s/%s", dir, name);
		while (access(path, F_OK))
			nanosleep(&ts, NULL);
		check(gen, msg, sizeof(msg));
		snprintf(name, sizeof(name), "out-%d", gen);
		write_gen(gen + 1);
		put(dir, name, msg);
	}
}
