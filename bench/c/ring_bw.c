/* Ring bandwidth and latency in the manner of the OSU micro-benchmarks, after warm-up
 * iterations and a barrier, for message sizes doubling from --min-bytes to --max-bytes.
 *
 * --mode sendrecv (default): every rank sends a message to its successor and receives one
 *   from its predecessor at the same time (MPI_Sendrecv): all links busy in both directions.
 * --mode token: one message goes round the ring, hop after hop (rank 0 sends to 1, 1 receives
 *   it and forwards that same buffer to 2, ..., the last back to 0): the pattern of Snake's
 *   peer-to-peer weight hops, one transfer in flight at a time, each sending data its sender
 *   has just written: the reference for snake_mpi's hops (bench/hop_vs_ring.sh). Benchmarks
 *   that send one unchanged buffer again and again report more below ~16 MiB, where the
 *   receiver finds the source in its own cache (--mode sendrecv here, python -m mpi4py.bench
 *   pingpong), and at every size when the send buffer was never written (pingpong's
 *   numpy.empty: the copy reads the kernel's zero page, +20-25 % at 64-256 MiB);
 *   bench/limit.py takes the best of all three as the limit.
 *
 *   mpirun -n 2 build/ring_bw [--mode sendrecv|token] [--min-bytes 1024]
 *       [--max-bytes 268435456] [--max-total-mib 1024] [--trials 1]
 *
 * --trials T repeats the timed loop T times per size and reports the fastest (as
 * bench/transfer.py does, so that the two compare like with like).
 *
 * Prints CSV on rank 0: bytes,iterations,latency_us,bandwidth_MBps (MB = 1e6 bytes;
 * sendrecv: latency = mean time of one Sendrecv, the slowest rank's; token: mean time of one
 * hop; bandwidth = bytes / latency).
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

/* A buffer aligned to 2 MiB and, on Linux, advised to use transparent huge pages, as NumPy
 * does for its large arrays: without it, messages from 256 KiB up run 10-15 % slower here than
 * the same messages from NumPy arrays, and the "limit" would not be one. Both buffers are
 * written before use (memset), as a sender's weights are. */
static char *buffer(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 2u << 20, bytes) != 0) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
}

static long parse(int argc, char **argv, const char *flag, long fallback) {
    for (int i = 1; i + 1 < argc; ++i)
        if (strcmp(argv[i], flag) == 0) return atol(argv[i + 1]);
    return fallback;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long min_bytes = parse(argc, argv, "--min-bytes", 1024);
    long max_bytes = parse(argc, argv, "--max-bytes", 256L << 20);
    long max_total = parse(argc, argv, "--max-total-mib", 1024) << 20;
    long trials = parse(argc, argv, "--trials", 1);
    int token = 0;
    for (int i = 1; i + 1 < argc; ++i)
        if (strcmp(argv[i], "--mode") == 0) {
            if (strcmp(argv[i + 1], "token") == 0) token = 1;
            else if (strcmp(argv[i + 1], "sendrecv") != 0) max_bytes = -1; /* rejected below */
        }
    if (size < 2 || min_bytes < 1 || max_bytes < min_bytes || trials < 1) {
        if (rank == 0)
            fprintf(stderr, "ring_bw: needs >= 2 ranks, 1 <= --min-bytes <= --max-bytes and "
                            "--mode sendrecv or token\n");
        MPI_Finalize();
        return 2;
    }
    char *send = buffer((size_t)max_bytes), *recv = buffer((size_t)max_bytes);
    if (!send || !recv) {
        fprintf(stderr, "ring_bw: rank %d: cannot allocate 2 x %ld bytes\n", rank, max_bytes);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    memset(send, rank & 0xff, (size_t)max_bytes);
    memset(recv, (token && rank == 0) ? 0xA5 : 0, (size_t)max_bytes); /* token: rank 0's data */
    int succ = (rank + 1) % size, pred = (rank - 1 + size) % size;
    if (rank == 0) {
        char version[MPI_MAX_LIBRARY_VERSION_STRING];
        int len;
        MPI_Get_library_version(version, &len);
        char *nl = strchr(version, '\n');
        if (nl) *nl = '\0';
        printf("# ring_bw: %d ranks, mode %s, %s\n", size, token ? "token" : "sendrecv", version);
        printf("bytes,iterations,latency_us,bandwidth_MBps\n");
    }
    for (long bytes = min_bytes; bytes <= max_bytes; bytes *= 2) {
        long iters = max_total / bytes;
        if (iters > 1000) iters = 1000;
        if (iters < 4) iters = 4;
        long warmup = iters / 10 + 1;
        double best = -1.0;
        for (long trial = 0; trial < trials; ++trial) {
        double t0 = 0.0;
        for (long i = 0; i < (trial == 0 ? warmup : 0) + iters; ++i) {
            if (i == (trial == 0 ? warmup : 0)) {
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
            }
            if (!token) {
                MPI_Sendrecv(send, (int)bytes, MPI_BYTE, succ, 1, recv, (int)bytes, MPI_BYTE,
                             pred, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else if (rank == 0) { /* starts the token, then waits for it to come round */
                MPI_Send(recv, (int)bytes, MPI_BYTE, succ, 1, MPI_COMM_WORLD);
                MPI_Recv(recv, (int)bytes, MPI_BYTE, pred, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else { /* passes on the very buffer it received, as a Snake node does */
                MPI_Recv(recv, (int)bytes, MPI_BYTE, pred, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Send(recv, (int)bytes, MPI_BYTE, succ, 1, MPI_COMM_WORLD);
            }
        }
        double elapsed = MPI_Wtime() - t0, slowest;
        MPI_Reduce(&elapsed, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        if (best < 0 || slowest < best) best = slowest;
        }
        if (recv[bytes - 1] != (token ? (char)0xA5 : (char)(pred & 0xff))) {
            fprintf(stderr, "ring_bw: rank %d: wrong data from rank %d\n", rank, pred);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        if (rank == 0) {
            double per = best / (double)iters / (token ? size : 1); /* token: per hop */
            printf("%ld,%ld,%.3f,%.1f\n", bytes, iters, per * 1e6, (double)bytes / per / 1e6);
            fflush(stdout);
        }
    }
    free(send);
    free(recv);
    MPI_Finalize();
    return 0;
}
