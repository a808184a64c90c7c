// The kernel's side of a commit's WAL writes (bench/results/2026-12-06-walbuf/README.md):
// gcc -O2 wal-writes.c -o wal-writes && ./wal-writes
#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
static double cpu(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int N=1314, K=20;
int main(){ char*buf=calloc(N,4120); char hdr[24]={1};
 long chunks[]={0,65536,126976,1<<30};
 int fd=open("wal-writes.tmp",O_RDWR|O_CREAT|O_TRUNC,0644);
 for(int r=0;r<3;r++) for(int c=0;c<4;c++){ double w=0;
  for(int k=0;k<K;k++){ off_t o=32+(off_t)(k%4)*N*4120; double a=cpu();
   if(!chunks[c]) for(int i=0;i<N;i++){pwrite(fd,hdr,24,o+i*4120); pwrite(fd,buf+i*4120+24,4096,o+i*4120+24);}
   else { long tot=(long)N*4120; for(long d=0;d<tot;d+=chunks[c]){ long m=tot-d<chunks[c]?tot-d:chunks[c]; pwrite(fd,buf+d,m,o+d);} }
   fdatasync(fd); w+=cpu()-a;}
  printf("chunk %ld: %.2f us/frame (write+sync)\n",chunks[c],w/(K*N)*1e6);}
}
