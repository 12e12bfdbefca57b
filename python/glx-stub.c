/* The libGLX.so.0 that the wheel bundles in place of the system's (scripts/python-env.sh hands it
 * to auditwheel). Debian's OpenCV core links GLX for its OpenGL interop (cv::ogl), which sluice
 * never calls; the real libGLX would need the system's libX11 and libGLdispatch, which slim
 * containers (python:3.11-slim, CUDA base images) lack, so `import sluice` would fail there.
 * These are the three functions OpenCV core imports. No context and no functions: were the interop
 * ever reached, OpenCV raises its "OpenGL API is not available" error instead of drawing. */
#include <stddef.h>

void* glXGetCurrentContext(void) { return NULL; }
void* glXGetCurrentDisplay(void) { return NULL; }
void (*glXGetProcAddressARB(const unsigned char* name))(void) {
  (void)name;
  return NULL;
}
