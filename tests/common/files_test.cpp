// Tests common/files.*: small files are read whole; what is not a small regular file is refused at
// once with a reason (no hang on a FIFO, no endless read of a device).
#include "common/files.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace kb {
namespace {

class ReadSmallFile : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (std::filesystem::temp_directory_path() / "kb-files-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& content) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << content;
    return path;
  }
  std::string reason_for(const std::string& path, std::size_t max = 1024) {
    try {
      read_small_file(path, max);
    } catch (const FileReadError& e) {
      EXPECT_EQ(std::string(e.what()), path + ": " + e.reason());
      return e.reason();
    }
    return "read";
  }
  std::string dir_;
};

TEST_F(ReadSmallFile, ReadsARegularFileWhole) {
  const std::string content = std::string("a\0b", 3) + std::string(5000, 'z');
  EXPECT_EQ(read_small_file(write("f", content), 8192), content);
  EXPECT_EQ(read_small_file(write("empty", ""), 10), "");
  EXPECT_EQ(read_small_file(write("exact", std::string(10, 'x')), 10), std::string(10, 'x'));
}

TEST_F(ReadSmallFile, RefusesWhatIsNotASmallRegularFile) {
  const std::string fifo = dir_ + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(reason_for(fifo), "it is a FIFO (named pipe), not a regular file");
  EXPECT_EQ(reason_for("/dev/zero"), "it is a character device, not a regular file");
  EXPECT_EQ(reason_for(dir_), "it is a directory, not a regular file");
  EXPECT_EQ(reason_for(write("big", std::string(1025, 'x'))),
            "it is larger than 1 KiB; is it the right file?");
  EXPECT_EQ(reason_for(dir_ + "/missing"), "No such file or directory");
}

TEST(DescribeBytes, ReadsAsPeopleWriteIt) {
  EXPECT_EQ(describe_bytes(1024 * 1024), "1 MiB");
  EXPECT_EQ(describe_bytes(64 * 1024), "64 KiB");
  EXPECT_EQ(describe_bytes(1000), "1000 bytes");
}

}  // namespace
}  // namespace kb
