/*
 * Preloaded into `criu restore` (LD_PRELOAD): asks the kernel, before CRIU forks the
 * restored tree, for permission to use dynamically enabled x86 state (AMX tile data).
 *
 * Why: oneDNN/PyTorch on CPUs with AMX call arch_prctl(ARCH_REQ_XCOMP_PERM) once at start.
 * The permission is per process, inherited on fork and reset on execve, and CRIU 4.2 does
 * not restore it: a restored vLLM CPU worker dies with SIGILL at its first AMX instruction.
 * Requested in criu's own process, every task CRIU forks inherits it. On CPUs without AMX
 * the request fails and nothing changes.
 */
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

__attribute__((constructor)) static void fastvllm_request_xcomp_perm(void)
{
	syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}
