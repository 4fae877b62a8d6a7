/* Ring bandwidth and latency in the manner of the OSU micro-benchmarks: every rank sends a
 * message of each size to its successor and receives one from its predecessor with
 * MPI_Sendrecv, after warm-up iterations and a barrier. This is the physical limit for
 * snake_mpi's weight hops on the machine it runs on.
 *
 *   mpirun -n 2 build/ring_bw [--min-bytes 1024] [--max-bytes 268435456] [--max-total-mib 1024]
 *
 * Prints CSV on rank 0: bytes,iterations,latency_us,bandwidth_MBps (MB = 1e6 bytes; one
 * message per rank per iteration; latency = mean time of one Sendrecv, the slowest rank's).
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    if (size < 2 || min_bytes < 1 || max_bytes < min_bytes) {
        if (rank == 0)
            fprintf(stderr, "ring_bw: needs >= 2 ranks and 1 <= --min-bytes <= --max-bytes\n");
        MPI_Finalize();
        return 2;
    }
    char *send = malloc((size_t)max_bytes), *recv = malloc((size_t)max_bytes);
    if (!send || !recv) {
        fprintf(stderr, "ring_bw: rank %d: cannot allocate 2 x %ld bytes\n", rank, max_bytes);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    memset(send, rank & 0xff, (size_t)max_bytes);
    memset(recv, 0, (size_t)max_bytes);
    int succ = (rank + 1) % size, pred = (rank - 1 + size) % size;
    if (rank == 0) {
        char version[MPI_MAX_LIBRARY_VERSION_STRING];
        int len;
        MPI_Get_library_version(version, &len);
        char *nl = strchr(version, '\n');
        if (nl) *nl = '\0';
        printf("# ring_bw: %d ranks, %s\n", size, version);
        printf("bytes,iterations,latency_us,bandwidth_MBps\n");
    }
    for (long bytes = min_bytes; bytes <= max_bytes; bytes *= 2) {
        long iters = max_total / bytes;
        if (iters > 1000) iters = 1000;
        if (iters < 4) iters = 4;
        long warmup = iters / 10 + 1;
        double t0 = 0.0;
        for (long i = 0; i < warmup + iters; ++i) {
            if (i == warmup) {
                MPI_Barrier(MPI_COMM_WORLD);
                t0 = MPI_Wtime();
            }
            MPI_Sendrecv(send, (int)bytes, MPI_BYTE, succ, 1, recv, (int)bytes, MPI_BYTE, pred, 1,
                         MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        }
        double elapsed = MPI_Wtime() - t0, slowest;
        MPI_Reduce(&elapsed, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        if (recv[bytes - 1] != (char)(pred & 0xff)) {
            fprintf(stderr, "ring_bw: rank %d: wrong data from rank %d\n", rank, pred);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        if (rank == 0) {
            double per = slowest / (double)iters;
            printf("%ld,%ld,%.3f,%.1f\n", bytes, iters, per * 1e6, (double)bytes / per / 1e6);
            fflush(stdout);
        }
    }
    free(send);
    free(recv);
    MPI_Finalize();
    return 0;
}
