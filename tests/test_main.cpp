// main() of every GoogleTest binary. Sets KB_SOURCE_DIR, KB_BINARY and KB_PYTHON from the paths
// CMake compiled in, unless the environment already has them: tests that run the real
// `kernel-bridge` or the site in a box find them whether started by ctest or by hand.
#include <gtest/gtest.h>

#include <cstdlib>

int main(int argc, char** argv) {
  ::setenv("KB_SOURCE_DIR", KB_TEST_SOURCE_DIR, 0);
  ::setenv("KB_BINARY", KB_TEST_BINARY, 0);
  ::setenv("KB_PYTHON", KB_TEST_PYTHON, 0);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
