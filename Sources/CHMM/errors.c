// The thread-local message behind hmm_last_error().
#include "hmm.h"
#include "hmm_internal.h"
#include <string.h>

static _Thread_local char last_error[512];

const char *hmm_last_error(void) { return last_error; }

void chmm_set_error(const char *message) {
    size_t n = strlen(message);
    if (n >= sizeof last_error) n = sizeof last_error - 1;
    memcpy(last_error, message, n);
    last_error[n] = 0;
}
