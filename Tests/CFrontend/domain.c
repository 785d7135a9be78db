/*
 * The guest's side of "Domains" (docs/loopback-hypervisor.md): domN/memory
 * and domN/grant-table, created and sized by the process playing the guest.
 */
#define _GNU_SOURCE
#include "frontend.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Creates (or reuses) a file of exactly `bytes` and maps it shared. The page
 * says the files are sized with ftruncate and never shrunk while the domain
 * lives, so an existing larger file is left as it is. */
static void *map_file(const char *path, size_t bytes)
{
    int fd = open(path, O_RDWR | O_CREAT, 0600);
    if (fd < 0) {
        perror(path);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || ((size_t)st.st_size < bytes && ftruncate(fd, (off_t)bytes) != 0)) {
        perror(path);
        close(fd);
        return NULL;
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        perror(path);
        return NULL;
    }
    return p;
}

int domain_create(struct domain *d, const char *root, unsigned domid, uint32_t pages, uint32_t grants)
{
    memset(d, 0, sizeof *d);
    d->domid = domid;
    snprintf(d->dir, sizeof d->dir, "%s/dom%u", root, domid);
    if (mkdir(d->dir, 0700) != 0 && errno != EEXIST) {
        perror(d->dir);
        return -1;
    }
    char path[600];
    snprintf(path, sizeof path, "%s/memory", d->dir);
    d->memory = map_file(path, (size_t)pages * PAGE_BYTES);
    snprintf(path, sizeof path, "%s/grant-table", d->dir);
    d->grants = map_file(path, (size_t)grants * sizeof(grant_entry_v1_t));
    if (!d->memory || !d->grants)
        return -1;
    d->pages = pages;
    d->nr_grants = grants;
    /* Frame 0 stays unused so that a zeroed field never names a real page. */
    d->next_frame = 1;
    d->next_gref = GNTTAB_NR_RESERVED_ENTRIES;   /* refs 0..7 are reserved */
    return 0;
}

int domain_alloc_frames(struct domain *d, uint32_t count, uint32_t *first)
{
    if (d->next_frame + count > d->pages)
        return -1;
    *first = d->next_frame;
    d->next_frame += count;
    memset(domain_frame(d, *first), 0, (size_t)count * PAGE_BYTES);
    return 0;
}

uint8_t *domain_frame(struct domain *d, uint32_t frame)
{
    return d->memory + (size_t)frame * PAGE_BYTES;
}

/* As on Xen: domid and frame first, a write barrier, then the flags that
 * make the entry valid, so the backend never sees a valid entry with a
 * stale frame. */
int grant_access(struct domain *d, uint32_t frame, unsigned to_domid, bool readonly, grant_ref_t *ref)
{
    if (d->next_gref >= d->nr_grants)
        return -1;
    grant_ref_t r = d->next_gref++;
    grant_entry_v1_t *g = &d->grants[r];
    __atomic_store_n(&g->domid, (domid_t)to_domid, __ATOMIC_RELAXED);
    __atomic_store_n(&g->frame, frame, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&g->flags, (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)), __ATOMIC_SEQ_CST);
    *ref = r;
    return 0;
}

void grant_revoke(struct domain *d, grant_ref_t ref)
{
    __atomic_store_n(&d->grants[ref].flags, (uint16_t)0, __ATOMIC_SEQ_CST);
}

int page_alloc(struct domain *d, bool readonly, struct page *p)
{
    if (domain_alloc_frames(d, 1, &p->frame) != 0)
        return -1;
    p->data = domain_frame(d, p->frame);
    return grant_access(d, p->frame, BACKEND_DOMID, readonly, &p->gref);
}

/* The domain is gone once its files are: call after the backend closed. */
void domain_destroy(struct domain *d)
{
    char path[600];
    if (d->memory)
        munmap(d->memory, (size_t)d->pages * PAGE_BYTES);
    if (d->grants)
        munmap(d->grants, (size_t)d->nr_grants * sizeof(grant_entry_v1_t));
    snprintf(path, sizeof path, "%s/memory", d->dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/grant-table", d->dir);
    unlink(path);
    d->memory = NULL;
    d->grants = NULL;
}
